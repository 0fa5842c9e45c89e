"""Compaction: free chunks that are mostly dead by copying their live records to the log's
tail, and the base that lets the block map be rebuilt without them.

A record is live while some version of some group (the live volume, a snapshot, a retained
flush point) names it; pruning and overwrites make records dead. Steps, each safe to die in:

1. Checkpoint; pick the victims: sealed chunks whose dead share is at least `min_dead`.
2. Copy each live record of a victim to the tail (flag RELOCATED: same header fields and
   payload, checked before copying; replay skips it). A victim with a damaged live record is
   left alone. Requests go on between batches.
3. Under the pool lock: checkpoint, then in one LMDB transaction point every version at the
   copies and checkpoint at the log address P after them. (A crash before this leaves the map
   on the originals, which still exist; the copies are dead.)
4. Write the map as of P into the log (BASE records, format/base.py) and sync it; note where
   its BASE_END is in POOL/base (a hint: without it a rebuild scans for the newest base).
5. Delete the victims.

A rebuild (index deleted) loads the newest complete base and replays from its P.
"""

import os
import time

import lmdb

from chunkvol import tiering
from chunkvol.errors import ChunkvolError, CorruptionError, FormatError
from chunkvol.format import base as base_format
from chunkvol.format import chunk_header, group_map
from chunkvol.format import checkpoint as checkpoint_format
from chunkvol.format import record
from chunkvol.format.record import CHECKSUM_BYTES, FLAG_RELOCATED, FLAG_ZSTD, HEADER_SIZE, RAW_BLOCK_BYTES, RecordType
from chunkvol.format import tombstones as tombstones_format
from chunkvol.index.blockmap import CHECKPOINT_KEY, ORIGIN_STAMPS_KEY, ORIGINS_KEY, REMOVED_VOLUMES_KEY, TOMBSTONES_KEY
from chunkvol.mirror import config as mirror_config
from chunkvol.log.reader import ChunkScan

DEFAULT_MIN_DEAD = 0.5
COPY_BATCH_BYTES = 4 << 20  # copied per hold of the pool lock
HINT_NAME = "base"
BASE_META_KEYS = (ORIGINS_KEY, ORIGIN_STAMPS_KEY, REMOVED_VOLUMES_KEY)  # the rest of meta: checkpoint, in BASE_END
TOMBSTONES_PER_ENTRY = 1000  # 40 KB: one base entry stays within a fragment


def live_records(pool):
    """{address: stored_length} of every record some stored version names. Call right after a
    checkpoint (every version is in LMDB then); reads one LMDB snapshot without the pool lock."""
    blockmap = pool.blockmap
    live = {}
    with blockmap.env.begin(db=blockmap.groups_db) as txn:
        for raw_key, raw in txn.cursor():
            for ref in group_map.decode_state(raw, raw_key)[1]:
                live[ref[0]] = ref[1]
    return live


def chunk_usage(pool, live):
    """{chunk_id: (written_bytes, live_bytes)} of the pool's chunks."""
    usage = {chunk_id: [pool.chunks.get(chunk_id).size_bytes - chunk_header.DATA_OFFSET, 0]
             for chunk_id in pool.chunks.ids()}
    for address, stored_length in live.items():
        entry = usage.get(chunk_header.split_address(address)[0])
        if entry is not None:
            entry[1] += HEADER_SIZE + stored_length
    return {chunk_id: tuple(entry) for chunk_id, entry in usage.items()}


def compact(pool, min_dead=None, progress=lambda count: None):
    """Compact the pool; returns a report of what was freed and copied."""
    min_dead = DEFAULT_MIN_DEAD if min_dead is None else float(min_dead)
    if not 0.0 < min_dead <= 1.0:
        raise ChunkvolError("min_dead must be in (0, 1]")
    started = time.monotonic()
    with pool.lock:
        pool._checkpoint_locked()
        tail_chunk = chunk_header.split_address(pool.writer.position)[0]
    live = live_records(pool)
    usage = chunk_usage(pool, live)
    # A mirror that has not shipped a chunk yet needs its records as they are.
    held = mirror_config.held_chunk(pool.path, pool.files)
    limit = tail_chunk if held is None else min(tail_chunk, held)
    victims = sorted(chunk_id for chunk_id, (written, live_bytes) in usage.items()
                     if chunk_id < limit and written > 0 and 1.0 - live_bytes / written >= min_dead)
    report = {"victims": [], "copied_records": 0, "copied_bytes": 0, "freed_bytes": 0, "skipped": [],
              "store_objects_deleted": 0, "store_objects_left": [], "seconds": 0.0,
              "held_for_mirrors_from_chunk": held}
    if not victims:
        report["seconds"] = round(time.monotonic() - started, 3)
        return report
    victim_set = set(victims)
    moves = sorted((address, stored) for address, stored in live.items()
                   if chunk_header.split_address(address)[0] in victim_set)
    remap, damaged = _copy_records(pool, moves, progress)
    for chunk_id in sorted(damaged):
        report["skipped"].append({"chunk": chunk_id, "reason": str(damaged[chunk_id])})
    victims = [chunk_id for chunk_id in victims if chunk_id not in damaged]
    remap = {old: new for old, new in remap.items() if chunk_header.split_address(old)[0] not in damaged}
    if not victims:
        report["seconds"] = round(time.monotonic() - started, 3)
        return report
    with pool.lock:
        _point_map_at_copies(pool, remap)
    write_base(pool)
    with pool.lock:
        freed, gone_remote = 0, []
        for chunk_id in victims:
            chunk = pool.chunks.get(chunk_id)
            if chunk.remote is None:
                freed += chunk.size_bytes
            else:
                gone_remote.append(chunk.remote.manifest)
            pool.chunks.remove(chunk_id)
    # Evicted victims' objects, outside the lock (many deletes); a failure leaves them behind,
    # said in the report, and costs only store space: nothing refers to them any more.
    deleted, left = tiering.delete_evicted_objects(gone_remote)
    report.update(victims=victims, copied_records=len(remap),
                  copied_bytes=sum(HEADER_SIZE + stored for address, stored in moves if address in remap),
                  freed_bytes=freed, store_objects_deleted=deleted, store_objects_left=left,
                  seconds=round(time.monotonic() - started, 3))
    return report


def _copy_records(pool, moves, progress):
    """Step 2: copy records to the tail, a batch per hold of the lock. Returns ({old: new},
    {chunk_id: error} of victims with a damaged live record)."""
    remap = {}
    damaged = {}
    index = 0
    while index < len(moves):
        with pool.lock:
            batch_bytes = 0
            while index < len(moves) and batch_bytes < COPY_BATCH_BYTES:
                address, stored = moves[index]
                index += 1
                chunk_id, offset = chunk_header.split_address(address)
                if chunk_id in damaged:
                    continue
                try:
                    remap[address] = _copy_one(pool, chunk_id, offset, stored)
                except CorruptionError as error:
                    damaged[chunk_id] = error
                batch_bytes += HEADER_SIZE + stored
                progress(HEADER_SIZE + stored)
    return remap, damaged


def _copy_one(pool, chunk_id, offset, stored):
    raw = pool.chunks.pread(chunk_id, HEADER_SIZE + stored, offset)
    if len(raw) != HEADER_SIZE + stored:
        raise CorruptionError("live record cut short", pool.chunks.get(chunk_id).path, offset)
    view = memoryview(raw)
    header = record.decode_header(view[:HEADER_SIZE], pool.chunks.get(chunk_id).path, offset)
    if header[0] != RecordType.EXTENT or header[3] != stored:
        raise CorruptionError("the block map names a record that is not this extent",
                              pool.chunks.get(chunk_id).path, offset)
    payload = view[HEADER_SIZE:]
    record.verify_payload(header, payload, pool.chunks.get(chunk_id).path, offset)
    flags = header[1] | FLAG_RELOCATED
    if header[1] & FLAG_ZSTD:
        table, data = b"", payload
    else:
        table_bytes = stored // RAW_BLOCK_BYTES * CHECKSUM_BYTES
        table, data = payload[:table_bytes], payload[table_bytes:]
    return pool.writer.append(RecordType.EXTENT, flags, header[2], data, header[4], header[5], header[6],
                              header[7], header[8], table)


def _point_map_at_copies(pool, remap):
    """Step 3, under the lock: every version that names a moved record names its copy."""
    pool._checkpoint_locked()  # the map is at the log's end: the remap changes only addresses
    blockmap = pool.blockmap
    blockmap._drop_reader()
    try:
        with blockmap.env.begin(write=True) as txn:
            cursor = txn.cursor(db=blockmap.groups_db)
            updates = []
            for raw_key, raw in cursor:
                slots, refs = group_map.decode_state(raw, raw_key)
                if any(ref[0] in remap for ref in refs):
                    moved = tuple((remap.get(ref[0], ref[0]),) + tuple(ref[1:]) for ref in refs)
                    updates.append((bytes(raw_key), group_map.encode_state((slots, moved), raw_key)))
            for raw_key, value in updates:
                txn.put(raw_key, value, db=blockmap.groups_db)
    except lmdb.Error as error:
        raise ChunkvolError(f"compaction could not update the block map ({error}); nothing was freed") from None
    blockmap.overlay.clear()  # a cache of states that may name the originals


# ---- the base -------------------------------------------------------------------------------
def write_base(pool):
    """Step 4: the map as of the current checkpoint, into the log, synced; then the hint."""
    blockmap = pool.blockmap
    with pool.lock:
        pool._checkpoint_locked()
        txn = blockmap.env.begin()
    try:
        raw_checkpoint = bytes(txn.get(CHECKPOINT_KEY, db=blockmap.meta_db))
        base_address = checkpoint_format.decode(raw_checkpoint).log_address
        addresses = _append_fragments(pool, base_format.fragments(base_address, _map_entries(blockmap, txn)),
                                      base_address)
    finally:
        txn.abort()
    levels = 0
    if len(addresses) > base_format.MAX_FRAGMENTS:  # a map too large to list in one BASE_END
        addresses = _append_fragments(pool, base_format.index_fragments(base_address, addresses), base_address)
        levels = 1
    end_payload = base_format.encode_end(raw_checkpoint, addresses, levels)
    end_address = _append_summary(pool, RecordType.BASE_END, [end_payload], base_address, len(addresses))[0]
    with pool.lock:
        pool.writer.sync()
        pool.files.publish(os.path.join(pool.path, HINT_NAME), f"{end_address}\n".encode())
    return end_address


def _map_entries(blockmap, txn):
    databases = [(base_format.DB_GROUPS, blockmap.groups_db), (base_format.DB_HISTORY, blockmap.history_db),
                 (base_format.DB_VOLUMES, blockmap.volumes_db), (base_format.DB_SNAPSHOTS, blockmap.snapshots_db)]
    if blockmap.conflicts_db is not None:
        databases.append((base_format.DB_CONFLICTS, blockmap.conflicts_db))
    for db_id, db in databases:
        for key, value in txn.cursor(db=db):
            yield db_id, bytes(key), bytes(value)
    for key in BASE_META_KEYS:
        value = txn.get(key, db=blockmap.meta_db)
        if value is not None:
            yield base_format.DB_META, key, bytes(value)
    # Tombstones, in pieces: a rebuild without them would let a late record of another node
    # that is older than a hole here win over the hole, and the nodes would diverge.
    raw = txn.get(TOMBSTONES_KEY, db=blockmap.meta_db)
    entries = [] if raw is None else tombstones_format.decode(raw, blockmap.path)
    for index in range(0, len(entries), TOMBSTONES_PER_ENTRY):
        yield (base_format.DB_META, b"%s/%d" % (TOMBSTONES_KEY, index // TOMBSTONES_PER_ENTRY),
               tombstones_format.encode(entries[index:index + TOMBSTONES_PER_ENTRY]))


def _append_fragments(pool, payloads, base_address):
    """Append BASE records, 64 per hold of the pool lock; their addresses in order."""
    addresses = []
    pending = []
    for payload in payloads:
        pending.append(payload)
        if len(pending) >= 64:
            addresses += _append_summary(pool, RecordType.BASE, pending, base_address, len(addresses))
            pending = []
    if pending:
        addresses += _append_summary(pool, RecordType.BASE, pending, base_address, len(addresses))
    return addresses


def _append_summary(pool, record_type, payloads, base_address, first_index):
    addresses = []
    with pool.lock:
        for index, payload in enumerate(payloads):
            address, _ = pool._append(record_type, 0, 0, payload, base_address, first_index + index)
            addresses.append(address)
    return addresses


def find_base(pool):
    """The newest complete base: (checkpoint, [data fragment addresses]) or None, every
    fragment read and checked. Tries the hint, then scans the whole log for BASE_END records
    (newest first)."""
    candidates = []
    hint = os.path.join(pool.path, HINT_NAME)
    try:
        with open(hint, "rb") as handle:
            candidates.append(int(handle.read(32).strip() or b"0"))
    except (OSError, ValueError):
        pass
    tried = set()
    for address in candidates:
        tried.add(address)
        found = _read_base(pool, address)
        if found is not None:
            return found
    ends = []
    for chunk_id in pool.chunks.ids():
        for offset, header, _ in ChunkScan(pool.chunks, chunk_id, chunk_header.DATA_OFFSET, verify_payloads=False):
            if header[0] == RecordType.BASE_END:
                ends.append(chunk_header.address(chunk_id, offset))
    for address in sorted(ends, reverse=True):
        if address not in tried:
            found = _read_base(pool, address)
            if found is not None:
                return found
    return None


def _read_record(pool, address, expected_type):
    chunk_id, offset = chunk_header.split_address(address)
    if chunk_id not in pool.chunks.chunks:
        return None
    raw = pool.chunks.pread(chunk_id, HEADER_SIZE, offset)
    try:
        header = record.decode_header(raw)
    except CorruptionError:
        return None
    if header[0] != expected_type:
        return None
    payload = pool.chunks.pread(chunk_id, header[3], offset + HEADER_SIZE)
    try:
        record.verify_payload(header, memoryview(payload))
    except CorruptionError:
        return None
    return header, payload


def _read_base(pool, end_address):
    found = _read_record(pool, end_address, RecordType.BASE_END)
    if found is None:
        return None
    header, payload = found
    try:
        raw_checkpoint, addresses, levels = base_format.decode_end(payload)
        checkpoint = checkpoint_format.decode(raw_checkpoint)
    except (FormatError, CorruptionError):
        return None
    if checkpoint.pool_uuid != pool.pool_uuid or checkpoint.log_address != header[7]:
        return None
    try:
        if levels:
            listed = []
            for index, address in enumerate(addresses):
                listed += base_format.decode_index_fragment(_fragment(pool, address, checkpoint), checkpoint.log_address,
                                                            index)
            addresses = listed
        for _ in _base_entries(pool, checkpoint, addresses):
            pass  # every fragment checked before the base is used
    except (FormatError, CorruptionError):
        return None
    return checkpoint, addresses


def _fragment(pool, address, checkpoint):
    fragment = _read_record(pool, address, RecordType.BASE)
    if fragment is None or fragment[0][7] != checkpoint.log_address:
        raise FormatError(f"base fragment at {address:#x} is missing, damaged or of another base")
    return fragment[1]


def _base_entries(pool, checkpoint, addresses):
    """The (db, key, value) entries of a base, one fragment in memory at a time."""
    for index, address in enumerate(addresses):
        yield from base_format.decode_fragment(_fragment(pool, address, checkpoint), checkpoint.log_address, index)


def load_base(pool):
    """At a rebuild: fill the empty block map from the newest base; its checkpoint, or None."""
    found = find_base(pool)
    if found is None:
        return None
    checkpoint, addresses = found
    blockmap = pool.blockmap
    databases = {base_format.DB_GROUPS: blockmap.groups_db, base_format.DB_HISTORY: blockmap.history_db,
                 base_format.DB_VOLUMES: blockmap.volumes_db, base_format.DB_SNAPSHOTS: blockmap.snapshots_db,
                 base_format.DB_CONFLICTS: blockmap.conflicts_db}
    tombstones = []
    blockmap._drop_reader()
    with blockmap.env.begin(write=True) as txn:
        for db_id, key, value in _base_entries(pool, checkpoint, addresses):
            if db_id != base_format.DB_META:
                txn.put(key, value, db=databases[db_id])
            elif key in BASE_META_KEYS:
                txn.put(key, value, db=blockmap.meta_db)
            elif key.startswith(TOMBSTONES_KEY + b"/"):
                tombstones += tombstones_format.decode(value, pool.path)
            # anything else in meta: the checkpoint comes from BASE_END alone
        if tombstones:
            txn.put(TOMBSTONES_KEY, tombstones_format.encode(tombstones), db=blockmap.meta_db)
        txn.put(CHECKPOINT_KEY, checkpoint_format.encode(checkpoint), db=blockmap.meta_db)
    return checkpoint
