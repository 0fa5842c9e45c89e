"""A pool's copy of a record that another pool's block map names: what a mirror gives a node
that heals a damaged record from it (heal.py), read here from a `dir:` mirror or sent over the
replication link in answer to a FETCH (mirror/node_link.py).

The copy is the one with the same stamp, stored length and flags (`ref` is the asker's map
entry: address, stored length, stamp, flags), found among the stored versions of the same
group of the volume (or of a clone's ancestors), and it is checked whole (header and payload
checksums, the volume offset the asker expects) before it is given."""

from chunkvol.errors import CorruptionError
from chunkvol.format import record
from chunkvol.format.record import HEADER_SIZE, RecordType


def find(pool, volume_ids, group, ref, record_offset):
    """The raw bytes and header of `pool`'s copy of record `ref`, checked; None when it has
    none. Hold its lock when it is a live pool (live_copy)."""
    _, stored_length, hlc, flags = ref
    for volume_id in volume_ids:
        for address, their_length, their_hlc, their_flags in pool.blockmap.group_refs(volume_id, group):
            if (their_hlc, their_length, their_flags) != (hlc, stored_length, flags):
                continue
            try:
                data = pool.writer.read(address, HEADER_SIZE + their_length)
                header = record.decode_header(memoryview(data)[:HEADER_SIZE])
                record.verify_payload(header, memoryview(data)[HEADER_SIZE:])
            except (CorruptionError, OSError):
                continue  # damaged here too: the asker tries another mirror
            if (header.record_type == RecordType.EXTENT and header.hlc == hlc
                    and header.offset_bytes == record_offset):
                return data, header
    return None


def live_copy(pool, volume_ids, group, ref, record_offset):
    """The raw bytes of a live pool's copy of record `ref` (a node answering a peer's FETCH,
    a `dir:` target's fetch), or None: its map checkpointed first, as find looks in LMDB."""
    with pool.lock:
        pool.checkpoint()  # the lock is reentrant: nothing is applied between the two
        found = find(pool, volume_ids, group, ref, record_offset)
    if found is None:
        return None
    data, _ = found
    return bytes(data)
