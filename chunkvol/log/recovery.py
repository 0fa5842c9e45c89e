"""Recovery: bring the block map up to the end of the log after any stop, clean or not.

1. Start at the checkpoint's log address (or at the first chunk when the map is rebuilt).
2. Walk the records in log order, chunk by chunk. A SEAL record ends a chunk; the walk goes on
   in the next chunk id. Every valid record goes to `apply(address, header, payload)`.
3. At a record that breaks a validity rule (see format/record.py), at address Q, look past Q
   for proof that Q was durable: a valid COMMIT record saying the log was synced past Q, or any
   valid record in a later chunk (a chunk receives records only after the one before it was
   synced).
   a. Proof found: Q is corruption inside durable data. It is reported (never returned as
      data: a record with a sound header is still mapped, so reads of it fail with EIO), then
      skipped, and the walk goes on.
   b. No proof: Q is the torn tail of writes that no flush covered. The log is cut at Q: the
      chunk file is truncated there and later chunk files are removed. Every write before Q
      stays, every write after it goes: prefix consistency.
4. Return where the writer continues, and the damage found.

A read-only open (writable=False) does the same walk but cuts nothing.
"""

from typing import NamedTuple

from chunkvol.errors import CorruptionError
from chunkvol.format import chunk_header
from chunkvol.format.chunk_header import DATA_OFFSET, address, split_address
from chunkvol.format.record import COMMIT_PAYLOAD, RecordType
from chunkvol.log.reader import ChunkScan, find_next_header


class RecoveryResult(NamedTuple):
    end_address: int
    records_applied: int
    damage: list
    cut_address: int  # where a torn tail was cut, or 0


def recover(chunks, start_address, apply, writable=True):
    chunk_id, offset = split_address(start_address)
    damage = []
    applied = 0
    if chunk_id in chunks.chunks and offset > chunks.get(chunk_id).size_bytes:
        raise CorruptionError(f"the log ends before the block map's checkpoint ({chunk_id}:{offset}); "
                              "the chunk file was cut short: `chunkvol check` shows what is lost",
                              chunks.get(chunk_id).path, chunks.get(chunk_id).size_bytes)
    while True:
        if chunk_id not in chunks.chunks:
            return RecoveryResult(address(chunk_id, DATA_OFFSET), applied, damage, 0)
        scan = ChunkScan(chunks, chunk_id, offset)
        for position, header, payload in scan:
            apply(address(chunk_id, position), header, payload)
            applied += 1
        later = [other for other in chunks.ids() if other > chunk_id]
        if scan.stop_error is None:
            if scan.sealed:
                chunk_id, offset = chunk_id + 1, DATA_OFFSET
                continue
            if not later:
                return RecoveryResult(address(chunk_id, scan.stop_offset), applied, damage, 0)
            damage.append(CorruptionError("chunk ends without its SEAL record although later chunks exist",
                                          chunks.get(chunk_id).path, scan.stop_offset))
            chunk_id, offset = chunk_id + 1, DATA_OFFSET
            continue
        stop = scan.stop_offset
        if _durable_after(chunks, chunk_id, stop):
            damage.append(scan.stop_error)
            header = _sound_header(chunks, chunk_id, stop)
            if header is not None:
                apply(address(chunk_id, stop), header, None)  # mapped, so reads say EIO
            resync = find_next_header(chunks, chunk_id, stop, chunks.get(chunk_id).size_bytes)
            if resync is None:
                chunk_id, offset = chunk_id + 1, DATA_OFFSET
            else:
                offset = resync
            continue
        if writable:
            chunks.truncate(chunk_id, stop)
            for other in later:
                chunks.remove(other)
        return RecoveryResult(address(chunk_id, stop), applied, damage, address(chunk_id, stop))


def _sound_header(chunks, chunk_id, offset):
    """The header at `offset` if it passes its own checks (only the payload is bad)."""
    from chunkvol.format import record
    chunk = chunks.get(chunk_id)
    try:
        header = record.decode_header(chunks.pread(chunk_id, record.HEADER_SIZE, offset), chunk.path, offset)
    except CorruptionError:
        return None
    return header if header[0] in (RecordType.EXTENT, RecordType.ZERO) else None


def _durable_after(chunks, chunk_id, stop):
    """True when a later valid record proves that the log at (chunk_id, stop) was durable."""
    stop_address = address(chunk_id, stop)
    position = find_next_header(chunks, chunk_id, stop, chunks.get(chunk_id).size_bytes)
    while position is not None:
        scan = ChunkScan(chunks, chunk_id, position)
        for _, header, payload in scan:
            if header[0] == RecordType.COMMIT and len(payload) == COMMIT_PAYLOAD.size:
                if COMMIT_PAYLOAD.unpack(payload)[0] > stop_address:
                    return True
        if scan.stop_error is None:
            break
        position = find_next_header(chunks, chunk_id, scan.stop_offset, chunks.get(chunk_id).size_bytes)
    for other in chunks.ids():
        if other > chunk_id:
            scan = ChunkScan(chunks, other, DATA_OFFSET)
            for _ in scan:
                return True
    return False
