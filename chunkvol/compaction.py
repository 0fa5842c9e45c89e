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

A rebuild (index deleted) loads the newest complete base and replays from its P (log/base.py).
"""

import os
import time

from chunkvol import tiering
from chunkvol.errors import ChunkvolError, CorruptionError
from chunkvol.format import base as base_format
from chunkvol.format import chunk_header
from chunkvol.format import checkpoint as checkpoint_format
from chunkvol.format import record
from chunkvol.format.record import CHECKSUM_BYTES, FLAG_RELOCATED, FLAG_ZSTD, HEADER_SIZE, RAW_BLOCK_BYTES, RecordType
from chunkvol.index.blockmap import CHECKPOINT_KEY
from chunkvol.log.base import HINT_NAME, entries_of
from chunkvol.mirror import config as mirror_config

DEFAULT_MIN_DEAD = 0.5
COPY_BATCH_BYTES = 4 << 20  # copied per hold of the pool lock


def live_records(pool):
    """{address: stored_length} of every record some stored version names. Call right after a
    checkpoint (every version is in LMDB then); reads one LMDB snapshot without the pool lock."""
    live = {}
    for _, _, (_, refs) in pool.blockmap.stored_versions():
        for address, stored_length, _, _ in refs:
            live[address] = stored_length
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
        pool.checkpoint()
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
    point_map_at_copies(pool, remap)
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
    if header.record_type != RecordType.EXTENT or header.stored_length != stored:
        raise CorruptionError("the block map names a record that is not this extent",
                              pool.chunks.get(chunk_id).path, offset)
    payload = view[HEADER_SIZE:]
    record.verify_payload(header, payload, pool.chunks.get(chunk_id).path, offset)
    if header.flags & FLAG_ZSTD:
        table, data = b"", payload
    else:
        table_bytes = stored // RAW_BLOCK_BYTES * CHECKSUM_BYTES
        table, data = payload[:table_bytes], payload[table_bytes:]
    return pool.writer.append(RecordType.EXTENT, header.flags | FLAG_RELOCATED, header.volume_id, data,
                              header.origin_node, header.origin_sequence, header.hlc, header.offset_bytes,
                              header.length_bytes, table)


def point_map_at_copies(pool, remap):
    """Step 3 (heal's too): every version that names a moved record ({old address: new})
    names its copy, in one LMDB transaction under the pool lock."""
    with pool.lock:
        pool.checkpoint()  # the map is at the log's end: the remap changes only addresses
        try:
            pool.blockmap.replace_addresses(remap)
        except ChunkvolError as error:
            raise ChunkvolError(f"the block map could not be pointed at the copies ({error}); "
                                "the originals stay in use, nothing was freed") from None


# ---- the base -------------------------------------------------------------------------------
def write_base(pool):
    """Step 4: the map as of the current checkpoint, into the log, synced; then the hint."""
    with pool.lock:
        pool.checkpoint()
        stored = pool.blockmap.stored()
    try:
        raw_checkpoint = stored.meta(CHECKPOINT_KEY)
        base_address = checkpoint_format.decode(raw_checkpoint).log_address
        addresses = _append_fragments(pool, base_format.fragments(base_address, entries_of(stored)), base_address)
    finally:
        stored.close()
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
            address, _ = pool.append(record_type, 0, 0, payload, base_address, first_index + index)
            addresses.append(address)
    return addresses
