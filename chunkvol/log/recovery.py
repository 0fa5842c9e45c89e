"""Recovery: bring the block map up to the end of the log after any stop, clean or not.

1. Start at the checkpoint's log address (or at the first chunk when the map is rebuilt).
   Every chunk from there up to the highest id present must exist: a hole is a chunk that is
   missing (a disk not mounted, a file moved away), never the end of the log, and the open is
   refused, naming it, before anything is cut or written. (Compaction frees only chunks below
   the replay start.) A writable open reads the chunks from there from the disk itself, not
   from the page cache: after a failed sync, a process that died or was restarted may have
   left pages there that look written but never reached the disk.
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
4. Records reach the block map a whole client request at a time: a request's records carry
   MORE but its last; a request cut off by the end of the log (or followed by a COMMIT) is
   discarded, and the cut moves back to its first record: a crash never shows half a write.
   Likewise another node's records (a mirror's log holds its source's batches) reach it a
   whole batch at a time, at that node's COMMIT; a batch cut off by the end of the log or
   followed by one of this node's records is discarded (its sender sends it again).
5. Return where the writer continues, and the damage found.

A read-only open (writable=False) does the same walk but cuts nothing.
"""

from typing import NamedTuple

from chunkvol.errors import CorruptionError
from chunkvol.format.chunk_header import DATA_OFFSET, address, split_address
from chunkvol.format import record
from chunkvol.format.record import (BLOCK_SIZE, COMMIT_PAYLOAD, FLAG_MORE, FLAG_RELOCATED, GROUP_SIZE, HEADER_SIZE,
                                    RecordType, commit_payload_valid)
from chunkvol.log.reader import ChunkScan, find_next_header
from chunkvol.log.writer import PAGE


class RecoveryResult(NamedTuple):
    end_address: int
    records_applied: int
    damage: list
    cut_address: int  # where a torn tail was cut, or 0
    requests_discarded: int  # records of client requests that never finished


class _Requests:
    """Hands records to `apply` a whole client request at a time (format/record.py: MORE)."""

    def __init__(self, apply, local_node=None):
        self.apply = apply
        self.pending = []   # (address, header) of an unfinished request
        self.local_node = local_node
        self.foreign = []   # (address, header, payload) of another node's batch before its COMMIT
        self.applied = 0
        self.discarded = 0

    def take(self, log_address, header, payload):
        record_type = header.record_type
        if self.local_node is not None and header.origin_node != self.local_node and record_type not in _LOCAL_TYPES:
            if record_type != RecordType.COMMIT:
                if not header.flags & FLAG_RELOCATED:
                    kept = None if payload is None or record_type in _REQUEST_TYPES else bytes(payload)
                    self.foreign.append((log_address, header, kept))
                return
            batch, self.foreign = self.foreign, []
            for item in batch:
                self._take(*item)
        elif self.foreign and record_type != RecordType.SEAL:
            self.discarded += len(self.foreign)  # a batch that never finished
            self.foreign.clear()
        self._take(log_address, header, payload)

    def _take(self, log_address, header, payload):
        record_type = header.record_type
        if record_type in _REQUEST_TYPES:
            if header.flags & FLAG_RELOCATED:
                return  # compaction's copy: the map (or a base) already points at it
            if header.flags & FLAG_MORE:
                self.pending.append((log_address, header))
                return
            for pending_address, pending_header in self.pending:
                self.apply(pending_address, pending_header, None)
            self.applied += len(self.pending)
            self.pending.clear()
        elif record_type in _SUMMARY_TYPES:
            return  # a base is read as a whole at rebuild, never replayed
        elif self.pending and record_type != RecordType.SEAL:
            self.discarded += len(self.pending)  # a request that never finished
            self.pending.clear()
        self.apply(log_address, header, payload)
        self.applied += 1


_REQUEST_TYPES = (RecordType.EXTENT, RecordType.ZERO)
_SUMMARY_TYPES = (RecordType.BASE, RecordType.BASE_END)
_LOCAL_TYPES = (RecordType.SEAL, RecordType.BASE, RecordType.BASE_END)  # never shipped


def recover(chunks, start_address, apply, writable=True, volume_sizes=None, local_node=None):
    """`volume_sizes()` gives {volume_id: size} to judge a damaged header's fields;
    `local_node`: this node's id, so other nodes' batches are applied whole or not at all."""
    chunk_id, offset = split_address(start_address)
    damage = []
    requests = _Requests(apply, local_node)
    missing = chunks.missing_between(chunk_id)
    if not missing and chunk_id not in chunks.chunks and offset > DATA_OFFSET:
        missing = [chunk_id]  # the checkpoint has records in it
    if missing:
        raise chunks.missing_error(missing)
    if writable:
        chunks.read_from_disk(chunk_id)
    if chunk_id in chunks.chunks and offset > chunks.get(chunk_id).size_bytes:
        raise CorruptionError(f"the log ends before the block map's checkpoint ({chunk_id}:{offset}); "
                              "the chunk file was cut short: `chunkvol check` shows what is lost",
                              chunks.get(chunk_id).path, chunks.get(chunk_id).size_bytes)
    while True:
        if chunk_id not in chunks.chunks:
            return _end(chunks, requests, address(chunk_id, DATA_OFFSET), damage, 0, writable)
        scan = ChunkScan(chunks, chunk_id, offset)
        take = requests.take
        for position, header, payload in scan:
            take(address(chunk_id, position), header, payload)
        later = [other for other in chunks.ids() if other > chunk_id]
        if scan.stop_error is None:
            if scan.sealed:
                chunk_id, offset = chunk_id + 1, DATA_OFFSET
                continue
            if not later:
                return _end(chunks, requests, address(chunk_id, scan.stop_offset), damage, 0, writable)
            damage.append(CorruptionError("chunk ends without its SEAL record although later chunks exist",
                                          chunks.get(chunk_id).path, scan.stop_offset))
            chunk_id, offset = chunk_id + 1, DATA_OFFSET
            continue
        stop = scan.stop_offset
        if _durable_after(chunks, chunk_id, stop):
            damage.append(scan.stop_error)
            resync = find_next_header(chunks, chunk_id, stop, chunks.get(chunk_id).size_bytes)
            header = _damaged_extent(chunks, chunk_id, stop, resync, volume_sizes() if volume_sizes else {})
            if header is not None:
                requests.take(address(chunk_id, stop), header, None)  # mapped, so reads say EIO
            if resync is None:
                chunk_id, offset = chunk_id + 1, DATA_OFFSET
            else:
                offset = resync
            continue
        # A writer with cache=none pads its last page with zeros: cut, but not a torn write.
        cut = 0 if not later and _zero_padding(chunks, chunk_id, stop) else address(chunk_id, stop)
        if writable:
            chunks.truncate(chunk_id, stop)
            for other in later:
                chunks.remove(other)
        return _end(chunks, requests, address(chunk_id, stop), damage, cut, writable)


def _zero_padding(chunks, chunk_id, stop):
    """True when the file from `stop` is zeros up to a page boundary within one page."""
    size = chunks.get(chunk_id).size_bytes
    if size % PAGE or not 0 < size - stop < PAGE:
        return False
    return not chunks.pread(chunk_id, size - stop, stop).strip(b"\x00")


def _end(chunks, requests, end_address, damage, cut_address, writable):
    """The end of the log. A request whose last record never came (or another node's batch
    whose COMMIT never came) is cut away with the tail (step 3b extends to it). If it began
    in an earlier, sealed chunk, only this chunk's part goes; the rest is discarded at the
    next replay by the COMMIT that opening writes next."""
    if requests.pending or requests.foreign:
        first = min(unfinished[0][0] for unfinished in (requests.pending, requests.foreign) if unfinished)
        first_chunk, first_offset = split_address(first)
        end_chunk, _ = split_address(end_address)
        cut_offset = first_offset if first_chunk == end_chunk else DATA_OFFSET
        requests.discarded += len(requests.pending) + len(requests.foreign)
        requests.pending.clear()
        requests.foreign.clear()
        if end_chunk in chunks.chunks:
            end_address = address(end_chunk, cut_offset)
            cut_address = end_address
            if writable:
                chunks.truncate(end_chunk, cut_offset)
    return RecoveryResult(end_address, requests.applied, damage, cut_address, requests.discarded)


def _damaged_extent(chunks, chunk_id, offset, next_offset, volume_sizes):
    """The header of a damaged durable EXTENT record, so that its blocks can be mapped to it
    (and fail with EIO when read) instead of silently showing older data. A header that
    fails its own checksum is used only if its fields fit where the record lies: its length
    reaches exactly the next valid record. ZERO records are never guessed: a guessed hole
    would read as zeros without any check."""
    chunk = chunks.get(chunk_id)
    raw = chunks.pread(chunk_id, HEADER_SIZE, offset)
    try:
        header = record.decode_header(raw, chunk.path, offset)
        sound = True
    except CorruptionError:
        header = record.decode_header_unchecked(raw)
        sound = False
    if header is None or header.record_type != RecordType.EXTENT:
        return None
    if sound:
        return header
    end = next_offset if next_offset is not None else chunk.size_bytes
    start, length = header.offset_bytes, header.length_bytes
    plausible = (offset + HEADER_SIZE + header.stored_length == end and length % BLOCK_SIZE == 0
                 and 0 < length <= GROUP_SIZE and start % BLOCK_SIZE == 0
                 and start // GROUP_SIZE == (start + length - 1) // GROUP_SIZE
                 and start + length <= volume_sizes.get(header.volume_id, 0))
    return header if plausible else None


def _durable_after(chunks, chunk_id, stop):
    """True when a later valid record proves that the log at (chunk_id, stop) was durable."""
    stop_address = address(chunk_id, stop)
    position = find_next_header(chunks, chunk_id, stop, chunks.get(chunk_id).size_bytes)
    while position is not None:
        scan = ChunkScan(chunks, chunk_id, position)
        for _, header, payload in scan:
            if header.record_type == RecordType.COMMIT and commit_payload_valid(len(payload)):
                if COMMIT_PAYLOAD.unpack_from(payload)[0] > stop_address:
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
