"""Self-healing from mirrors, as ZFS heals from a mirror side: a live record that fails its
checksum here is fetched from a mirror that holds it (the same origin stamp, in its block map
at the same volume and group: copies.py), checked there and against what this map expects,
appended to this log again as a RELOCATED copy, and the block map is pointed at the copy in
one LMDB transaction (compaction's step 3); a base (compaction.write_base) makes that hold for
a rebuild too. `scrub` does it for every damaged live record; a read of a Volume given the
hook `heal_read` (the nbdkit plugin's) that meets one heals it and reads again, or fails with
EIO where no mirror has a good copy.

Mirrors are looked up in this order: `dir:` mirrors (a pool readable here), `node:` mirrors
and peers (a FETCH over the replication link, mirror/node_link.py), then object stores
(`rados:`, `s3:`: the segment that origin shipped, mirror/object_heal.py). What an object
store answers is kept for the rest of one heal pass (its listing, segment headers, fetched
segments), and no store is opened before a copy is looked for there.
"""

import os

from chunkvol import compaction, copies, objstore
from chunkvol.errors import ChunkvolError, CorruptionError
from chunkvol.format import chunk_header, group_map, record
from chunkvol.format.record import (BLOCK_SIZE, CHECKSUM_BYTES, FLAG_RELOCATED, FLAG_ZSTD, GROUP_BLOCKS, GROUP_SIZE,
                                    HEADER_SIZE, RAW_BLOCK_BYTES, RecordType)
from chunkvol.log.scan import scan_log
from chunkvol.mirror import config as mirror_config
from chunkvol.mirror import targets
from chunkvol.mirror.object_heal import PassStores
from chunkvol.pool import Pool


def _mirror_pools(definitions):
    for name, definition in definitions:
        if not definition["to"].startswith("dir:"):
            continue
        path = definition["to"][4:]
        if not os.path.exists(os.path.join(path, "pool.json")):
            continue
        try:
            mirror = Pool.open(path, readonly=True)
        except ChunkvolError:
            continue
        try:
            yield name, mirror
        finally:
            mirror.close()


def good_copy(pool, volume_ids, group, ref, record_offset, stores):
    """(mirror name, raw bytes, header) of a good copy of `ref`, or None. `stores` (a
    PassStores) holds the object stores of this heal pass."""
    definitions = sorted(mirror_config.load_mirrors(pool.path, pool.files).items())
    for name, mirror in _mirror_pools(definitions):
        found = copies.find(mirror, volume_ids, group, ref, record_offset)
        if found is not None:
            return (name,) + found
    for name, definition in definitions:
        if definition["to"].startswith("node:"):
            found = _fetch_from_node(pool, definition["to"], volume_ids, group, ref, record_offset)
            if found is not None:
                return (name,) + found
    for name, definition in definitions:
        if definition["to"].startswith(("rados:", "s3:")):
            try:
                key = mirror_config.key_of(definition)
            except ChunkvolError:  # its key file is gone or changed: this mirror cannot help
                continue
            found = stores.find(definition["to"], volume_ids, ref, record_offset, key)
            if found is not None:
                return (name,) + found
    return None


def _fetch_from_node(pool, target, volume_ids, group, ref, record_offset):
    try:
        link = targets.open_target(target, pool.fields, pool.path)
    except ChunkvolError:
        return None
    try:
        data = link.fetch(volume_ids, group, ref, record_offset)
    except ChunkvolError:
        return None
    finally:
        link.close()
    if not data:
        return None
    try:
        header = record.decode_header(memoryview(data)[:HEADER_SIZE])
        record.verify_payload(header, memoryview(data)[HEADER_SIZE:])
    except CorruptionError:
        return None
    _, stored_length, hlc, _ = ref
    if (header.record_type != RecordType.EXTENT or header.hlc != hlc or header.stored_length != stored_length
            or header.offset_bytes != record_offset or header.volume_id not in volume_ids):
        return None
    return data, header


def _append_copy(pool, data, header):
    payload = memoryview(data)[HEADER_SIZE:]
    if header.flags & FLAG_ZSTD:
        table, body = b"", payload
    else:
        table_bytes = header.stored_length // RAW_BLOCK_BYTES * CHECKSUM_BYTES
        table, body = payload[:table_bytes], payload[table_bytes:]
    return pool.writer.append(RecordType.EXTENT, (header.flags | FLAG_RELOCATED) & ~record.FLAG_MORE, header.volume_id,
                              body, header.origin_node, header.origin_sequence, header.hlc, header.offset_bytes,
                              header.length_bytes, table)


def heal(pool, damaged, store_retry_seconds=None):
    """Heal records: `damaged` is [(volume ids to look in, group, ref, record volume offset)];
    `store_retry_seconds`: how long an object store's faults are retried (its default if None).
    Returns ({address: mirror name} healed, [addresses no mirror had])."""
    remap, sources, missing = {}, {}, []
    stores = PassStores(pool.pool_uuid, store_retry_seconds)
    try:
        # In stamp order: an object store's copies of one batch are one segment, fetched once.
        for volume_ids, group, ref, record_offset in sorted(damaged, key=_stamp_of_ref):
            address, _, _, _ = ref
            if address in remap or address in missing:
                continue
            found = good_copy(pool, volume_ids, group, ref, record_offset, stores)
            if found is None:
                missing.append(address)
                continue
            name, data, header = found
            with pool.lock:
                remap[address] = _append_copy(pool, data, header)
            sources[address] = name
    finally:
        stores.close()
    if remap:
        compaction.point_map_at_copies(pool, remap)
        compaction.write_base(pool)
    return sources, missing


def _stamp_of_ref(damaged):
    _, _, (_, _, hlc, _), _ = damaged
    return hlc


# A client waits on a read that heals (and, served one request at a time, every other client
# with it): an object store that is away is given up after this, and the read is EIO.
READ_STORE_RETRY_SECONDS = 2.0


def heal_read(volume, error):
    """A read of `volume` met `error`; heal the record it names if a mirror has it. True when
    healed. The hook a Volume is given (volume.open_volume) where reads should heal."""
    pool = volume.pool
    damage = getattr(error, "damage", None)
    if damage is None or pool.readonly:
        return False
    ref, record_offset = damage
    try:
        healed, _ = heal(pool, [(volume.lineage_ids(), record_offset // GROUP_SIZE, ref, record_offset)],
                         store_retry_seconds=min(READ_STORE_RETRY_SECONDS, objstore.RETRY_SECONDS))
    except ChunkvolError:
        return False
    return bool(healed)


def scrub(pool, progress=None):
    """Verify every record; heal each damaged live one from a mirror. A report (JSON-able)."""
    pool.checkpoint()
    problems, records, scanned = scan_log(pool.chunks, progress, tail_may_be_unfinished=pool.readonly)
    damaged_addresses = {}
    for path, offset, message in problems:
        chunk_id = next(c for c in pool.chunks.ids() if pool.chunks.get(c).path == path)
        damaged_addresses[chunk_header.address(chunk_id, offset)] = message
    wanted, unused = [], []
    if damaged_addresses:
        seen = set()
        for volume_id, group, (slots, refs) in pool.blockmap.stored_versions():
            for index, ref in enumerate(refs):
                address, _, _, _ = ref
                if address in damaged_addresses and address not in seen:
                    seen.add(address)
                    slot = next(i for i, s in enumerate(slots) if s != group_map.HOLE and s >> 4 == index)
                    record_offset = (group * GROUP_BLOCKS + slot - (slots[slot] & 0x0F)) * BLOCK_SIZE
                    wanted.append(([volume_id], group, ref, record_offset))
        unused = sorted(set(damaged_addresses) - seen)
    healed, missing = heal(pool, wanted) if wanted else ({}, [])

    def where(address):
        chunk_id, offset = chunk_header.split_address(address)
        return f"{chunk_id}:{offset}"

    return {"records": records, "bytes": scanned, "damaged": len(damaged_addresses),
            "healed": [{"record": where(a), "from": m, "problem": damaged_addresses[a]} for a, m in sorted(healed.items())],
            "not_healed": [{"record": where(a), "problem": damaged_addresses[a]} for a in missing],
            "damaged_but_unused": [{"record": where(a), "problem": damaged_addresses[a]} for a in unused]}
