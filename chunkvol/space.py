"""Where the space goes: live data per chunk and per volume, for `status`.

Walks the newest version of every group of every volume (one LMDB seek per written group),
so it costs what the written part of the volumes costs, not their size.
"""

from chunkvol.format import chunk_header, group_map
from chunkvol.format.record import BLOCK_SIZE, FLAG_ZSTD, GROUP_BLOCKS, HEADER_SIZE, RAW_BLOCK_BYTES

SCAN_BATCH = 4096


def live_groups(pool, volume_id):
    """Yield (group, state) for every written group of a volume, in order."""
    blockmap = pool.blockmap
    end = -(-pool.volumes_by_id[volume_id].size_bytes // (BLOCK_SIZE * GROUP_BLOCKS))
    txn = blockmap.reader()
    group = 0
    while group < end:
        batch = blockmap.groups_in(txn, volume_id, group, end, SCAN_BATCH)
        if not batch:
            return
        for found in batch:
            state = blockmap.get(txn, volume_id, found)
            if state is not None:
                yield found, state
        group = batch[-1] + 1


def pool_space(pool):
    """{'volumes': {name: {...}}, 'live_bytes_by_chunk': {chunk_id: bytes}}."""
    by_chunk = {}
    volumes = {}
    with pool.lock:
        for name, info in sorted(pool.volumes.items()):
            mapped_blocks = 0
            stored = 0
            logical_in_records = 0
            for _, (slots, refs) in live_groups(pool, info.volume_id):
                mapped_blocks += GROUP_BLOCKS - slots.count(group_map.HOLE)
                for address, stored_length, _, flags in refs:
                    chunk_id = chunk_header.split_address(address)[0]
                    by_chunk[chunk_id] = by_chunk.get(chunk_id, 0) + HEADER_SIZE + stored_length
                    stored += stored_length
                    if flags & FLAG_ZSTD:
                        logical_in_records += _compressed_logical(slots, refs, address)
                    else:
                        logical_in_records += stored_length // RAW_BLOCK_BYTES * BLOCK_SIZE
            volumes[name] = {
                "id": info.volume_id,
                "size": info.size_bytes,
                "compression": info.compression,
                "mapped_bytes": mapped_blocks * BLOCK_SIZE,
                "stored_bytes": stored,
                "compression_ratio": round(logical_in_records / stored, 3) if stored else 1.0,
            }
    return {"volumes": volumes, "live_bytes_by_chunk": by_chunk}


def _compressed_logical(slots, refs, address):
    """Logical bytes of a compressed record, from the slots that name it: a record's blocks
    are consecutive, so the largest block index + 1 bounds its length."""
    index = next(i for i, (ref_address, _, _, _) in enumerate(refs) if ref_address == address)
    used = [slot & 0x0F for slot in slots if slot != group_map.HOLE and slot >> 4 == index]
    return (max(used) + 1) * BLOCK_SIZE if used else 0
