"""Applying a record of the log to the pool's state: the one code path for records replayed
at open, received from another node (mirror/receiver.py) and just written here (so what a
pool shows after a crash is what its log says).

This node's EXTENT and ZERO records change the block map directly; another node's go through
last-writer-wins (merge.py); a COMMIT seals the versions of its node's flush interval; volume
records change the volume table (volumes.py); history records (snapshot, rollback, prune) go
to history.py."""

from chunkvol import history
from chunkvol.clock import node_index_of
from chunkvol.format import group_map
from chunkvol.format.record import BLOCK_SIZE, FLAG_ZSTD, GROUP_BLOCKS, HEADER_SIZE, RecordType, commit_seen
from chunkvol.pool import journal, merge, volumes

VOLUME_RECORDS = (RecordType.VOLUME_CREATE, RecordType.VOLUME_RESIZE, RecordType.VOLUME_REMOVE,
                  RecordType.VOLUME_PRIMARY)
HISTORY_RECORDS = (RecordType.SNAPSHOT, RecordType.ROLLBACK, RecordType.PRUNE)


def apply_replayed(pool, address, header, payload):
    """Recovery's callback for every record it replays at open."""
    pool.replayed_at_open += 1
    apply_record(pool, address, header, payload)


def apply_record(pool, address, header, payload, checkpoint=True):
    """One record of the log (its address, RecordHeader and payload). `checkpoint`: whether
    a long replay may checkpoint at a COMMIT (a receiver checkpoints after its batch)."""
    # Unpacked, not read by name: replay runs this for every record of the log.
    record_type, flags, volume_id, stored_length, node, sequence, hlc, offset_bytes, length_bytes, _ = header
    if hlc > pool.clock.last:
        pool.clock.last = hlc
    if node == pool.node_id:
        if sequence >= pool.next_sequence:
            pool.next_sequence = sequence + 1
    elif sequence > pool.origins.get(node, 0):
        pool.origins[node] = sequence
    if record_type == RecordType.EXTENT:
        if volume_id in pool.volumes_by_id:
            ref = (address, stored_length, hlc, flags & FLAG_ZSTD)
            if node == pool.node_id:
                map_extent(pool, volume_id, offset_bytes, length_bytes, ref, hlc, node)
                count_written(pool, volume_id, length_bytes)
            else:
                merge.merge_foreign(pool, volume_id, offset_bytes, length_bytes, ref, hlc, node)
    elif record_type == RecordType.ZERO:
        if volume_id in pool.volumes_by_id:
            if node == pool.node_id:
                map_hole(pool, volume_id, offset_bytes, length_bytes, hlc, node)
                count_written(pool, volume_id, length_bytes)
            elif merge.merge_foreign(pool, volume_id, offset_bytes, length_bytes, None, hlc, node):
                merge.add_tombstone(pool, volume_id, offset_bytes, length_bytes, hlc, node)
    elif record_type == RecordType.COMMIT:
        _apply_commit(pool, node, hlc, payload)
        if checkpoint:
            journal.replay_checkpoint_if_due(pool, address + HEADER_SIZE + stored_length)
    elif record_type in VOLUME_RECORDS:
        if payload is not None:
            volumes.apply_volume_record(pool, record_type, volume_id, bytes(payload), hlc)
    elif record_type in HISTORY_RECORDS:
        if payload is not None and volume_id in pool.volumes_by_id:
            history.apply_record(pool, record_type, volume_id, bytes(payload), hlc, node)


def _apply_commit(pool, node, hlc, payload):
    """A flush point of `node`: its versions since its last one are sealed at `hlc`."""
    pool.tombstones.commit(node_index_of(hlc), hlc)
    if node == pool.node_id:
        pool.blockmap.seal(hlc, node)
    else:
        seen = commit_seen(payload)
        pool.blockmap.seal_foreign(hlc, node, pool.tombstones, seen)
        pool.peer_seen[node] = seen
        pool.origin_stamps[node] = max(hlc, pool.origin_stamps.get(node, 0))
    pool.committed_stamp = max(pool.committed_stamp, hlc)


def count_written(pool, volume_id, length_bytes):
    written = pool.blockmap.written
    written[volume_id] = written.get(volume_id, 0) + length_bytes


def map_extent(pool, volume_id, offset_bytes, length_bytes, ref, hlc, node):
    """Blocks [offset, offset+length) of one group now live in record `ref`."""
    group, first = divmod(offset_bytes // BLOCK_SIZE, GROUP_BLOCKS)
    count = length_bytes // BLOCK_SIZE
    blockmap = pool.blockmap
    state = None
    if count != GROUP_BLOCKS:
        state = blockmap.overlay.get((volume_id, group))
        if state is None:
            txn = blockmap.reader()
            state = blockmap.stored_state(txn, volume_id, group)
    blockmap.update(volume_id, group, group_map.apply_write(state, first, count, ref), hlc, node)


def map_hole(pool, volume_id, offset_bytes, length_bytes, hlc, node):
    """Blocks [offset, offset+length) read as zeros from now on (any number of groups)."""
    merge.add_tombstone(pool, volume_id, offset_bytes, length_bytes, hlc, node)
    first_block = offset_bytes // BLOCK_SIZE
    end_block = first_block + length_bytes // BLOCK_SIZE
    blockmap = pool.blockmap
    first_group = first_block // GROUP_BLOCKS
    end_group = (end_block + GROUP_BLOCKS - 1) // GROUP_BLOCKS
    txn = blockmap.reader()
    group = first_group
    while group < end_group:
        batch = blockmap.groups_in(txn, volume_id, group, end_group, 4096)
        if not batch:
            break
        for found in batch:
            state = blockmap.get(txn, volume_id, found)
            if state is None or group_map.is_hole(state):
                continue
            start = max(first_block, found * GROUP_BLOCKS) - found * GROUP_BLOCKS
            end = min(end_block, (found + 1) * GROUP_BLOCKS) - found * GROUP_BLOCKS
            blockmap.update(volume_id, found, group_map.apply_hole(state, start, end - start), hlc, node)
        group = batch[-1] + 1
