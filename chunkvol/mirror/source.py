"""This node's own records, read from its chunk files on disk (never from a server's memory),
from a cursor up to a horizon, cut into batches at its flush points.

A batch is every shippable record of this node between two of its COMMITs, the second
included: what mirror/receiver.py applies whole. Records that are not shipped still move the
cursor: other nodes' records (they ship their own), SEALs (a fact of one log), compaction's
RELOCATED copies and BASE summaries (their originals were shipped before compaction could
free them: compaction keeps every chunk at or after a mirror's cursor).
"""

import time

from chunkvol.errors import CorruptionError
from chunkvol.format.chunk_header import DATA_OFFSET, address, split_address
from chunkvol.format.record import FLAG_MORE, FLAG_RELOCATED, HEADER_SIZE, SHIPPED_TYPES, RecordType
from chunkvol.log.reader import ChunkScan
from chunkvol.storage.chunks import ChunkTable


class Batch:
    """Raw records (bytes) of whole flush intervals; `end` is the cursor after them."""
    __slots__ = ("records", "end", "last_sequence", "size_bytes", "first_stamp")

    def __init__(self, records, end, last_sequence, size_bytes, first_stamp):
        self.records = records
        self.end = end
        self.last_sequence = last_sequence
        self.size_bytes = size_bytes
        self.first_stamp = first_stamp


class LogSource:
    """Read-only view of a pool's chunk files for shipping (another process may write them)."""

    def __init__(self, pool_path, fields, files):
        self.node_id = fields["node_id"]
        directories = [chunk_dir if chunk_dir.startswith("/") else f"{pool_path}/{chunk_dir}"
                       for chunk_dir in fields["chunk_dirs"]]
        self.chunks = ChunkTable(files, bytes.fromhex(fields["pool_uuid"]), directories, fields["chunk_size"],
                                 writable=False)
        self.chunks.load()

    def refresh(self):
        """Pick up chunks created (or removed) since: the writer lives in another process."""
        self.chunks.close()
        self.chunks.load()

    def close(self):
        self.chunks.close()

    def distance(self, start, end):
        return log_distance(self.chunks, start, end)

    def first_own_stamp(self, cursor, horizon):
        """Stamp of the first record of this node at or after `cursor` (0: none before horizon)."""
        for _, header, _ in self.walk(cursor, horizon):
            if (header.origin_node == self.node_id and header.record_type in SHIPPED_TYPES
                    and header.record_type != RecordType.COMMIT):
                return header.hlc
        return 0

    def first_address(self):
        ids = self.chunks.ids()
        return address(ids[0] if ids else 1, DATA_OFFSET)

    def batches(self, cursor, horizon, max_bytes, skip_through=0):
        """Yield Batch objects covering [cursor, the last COMMIT of this node before horizon):
        each ends after a COMMIT, holding whole flush intervals while under `max_bytes`
        (at least one). Own records with sequence <= `skip_through` (the receiver has them)
        are left out; a batch with no records just moves the cursor."""
        records, size, first_stamp, last_sequence = [], 0, None, 0
        cut = None  # (record count, end address, last sequence, size, first stamp) at the last COMMIT
        request = []  # records of a client request whose last record has not come yet (FLAG_MORE)
        for position, header, raw in self.walk(cursor, horizon):
            if header.origin_node != self.node_id:
                continue
            record_type, flags, sequence = header.record_type, header.flags, header.origin_sequence
            if record_type in SHIPPED_TYPES and not flags & FLAG_RELOCATED and sequence > skip_through:
                if flags & FLAG_MORE:
                    request.append((bytes(raw), header))
                    continue
                if request:
                    if record_type in (RecordType.EXTENT, RecordType.ZERO):
                        for raw_more, header_more in request:  # the request's last record: it is whole
                            records.append(raw_more)
                            size += len(raw_more)
                            if first_stamp is None:
                                first_stamp = header_more.hlc
                    # else: a request cut by a crash (its last record was lost with the tail):
                    # recovery dropped it here, so it is never shipped either.
                    request = []
                records.append(bytes(raw))
                size += len(raw)
                last_sequence = sequence
                if first_stamp is None:
                    first_stamp = header.hlc
            if record_type == RecordType.COMMIT:
                cut = (len(records), position + HEADER_SIZE + header.stored_length, last_sequence, size, first_stamp)
                if size >= max_bytes:
                    yield Batch(records, cut[1], last_sequence, size, first_stamp)
                    records, size, first_stamp, last_sequence, cut = [], 0, None, 0, None
        if cut is not None:  # records after the last COMMIT wait for the next flush point
            count, end, last, size, first = cut
            yield Batch(records[:count], end, last, size, first)

    def walk(self, cursor, horizon):
        """(log address, header, raw record view) of every valid record in [cursor, horizon)."""
        chunk_id, offset = split_address(cursor)
        horizon_chunk, horizon_offset = split_address(horizon)
        refreshed = False
        while chunk_id <= horizon_chunk:
            if chunk_id not in self.chunks.chunks:
                self.refresh()
                if chunk_id not in self.chunks.chunks:
                    if any(other > chunk_id for other in self.chunks.ids()):
                        raise CorruptionError(f"chunk {chunk_id}, which a mirror still needs, is gone")
                    return
            chunk = self.chunks.get(chunk_id)
            end = horizon_offset if chunk_id == horizon_chunk else None
            scan = ChunkScan(self.chunks, chunk_id, offset, end_offset=end, keep_raw=True)
            for position, header, _ in scan:
                yield address(chunk_id, position), header, scan.raw
            if scan.stop_error is not None:
                if not refreshed:
                    # The file's size was read while the writer (another process) was in the
                    # middle of a record: read the table again before calling it damage.
                    self.refresh()
                    refreshed, offset = True, scan.stop_offset
                    continue
                raise CorruptionError(f"cannot ship past damage: {scan.stop_error}")
            if chunk_id == horizon_chunk:
                return
            if not scan.sealed:
                if refreshed:
                    raise CorruptionError("chunk ends without its SEAL record although the log goes on",
                                          chunk.path, scan.stop_offset)
                self.refresh()  # it was still being written when we listed it
                refreshed, offset = True, scan.stop_offset
                continue
            chunk_id, offset, refreshed = chunk_id + 1, DATA_OFFSET, False


def log_distance(chunks, start, end):
    """Log bytes between two addresses of a chunk table (chunks hold records from DATA_OFFSET on)."""
    start_chunk, start_offset = split_address(start)
    end_chunk, end_offset = split_address(end)
    if end <= start:
        return 0
    if start_chunk == end_chunk:
        return end_offset - start_offset
    total = end_offset - DATA_OFFSET
    for chunk_id in chunks.ids():
        if start_chunk <= chunk_id < end_chunk:
            size = chunks.get(chunk_id).size_bytes
            total += size - (start_offset if chunk_id == start_chunk else DATA_OFFSET)
    return max(0, total)


def age_seconds(stamp):
    """Seconds since an HLC stamp (wall ms << 16 | counter)."""
    return max(0.0, time.time() - (stamp >> 16) / 1000.0) if stamp else 0.0

