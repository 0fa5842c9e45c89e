"""LogReader: walks the records of one chunk in order, in large windows.

The reader does not decide what a bad record means: it stops there and says where and why
(`stop_offset`, `stop_error`); recovery and `check` decide (LevelDB's log reader does the same
through a callback).
"""

from chunkvol.errors import CorruptionError
from chunkvol.format import record
from chunkvol.format.record import HEADER_SIZE, RecordType

WINDOW_BYTES = 8 << 20


class ChunkScan:
    """Iterate (offset, header, payload) over the valid records of a chunk from `offset`.

    Stops at the end of the chunk's file (stop_error None), after a SEAL record (sealed True),
    or at the first record breaking a validity rule (stop_error set). Payloads are memoryviews
    into the current window: copy them to keep them.
    """

    def __init__(self, chunks, chunk_id, offset, verify_payloads=True, end_offset=None, keep_raw=False):
        self.chunks = chunks
        self.chunk = chunks.get(chunk_id)
        self.offset = offset
        self.end_offset = self.chunk.size_bytes if end_offset is None else end_offset
        self.verify_payloads = verify_payloads
        self.keep_raw = keep_raw  # set `raw` to the whole record's bytes (a view) at each step
        self.raw = None
        self.stop_offset = None
        self.stop_error = None
        self.sealed = False

    def __iter__(self):
        path = self.chunk.path
        position = self.offset
        window_start = position
        window = b""
        end = self.end_offset
        while position < end:
            if end - position < HEADER_SIZE:
                self._stop(position, CorruptionError("truncated record header at the end of the chunk", path, position))
                return
            local = position - window_start
            if local + HEADER_SIZE > len(window):
                window_start = position
                window = self.chunks.pread(self.chunk.chunk_id, min(WINDOW_BYTES, end - position), position)
                local = 0
            view = memoryview(window)
            try:
                header = record.decode_header(view[local:local + HEADER_SIZE], path, position)
            except CorruptionError as error:
                self._stop(position, error)
                return
            size = HEADER_SIZE + header.stored_length
            if position + size > end:
                self._stop(position, CorruptionError("record runs past the end of the chunk", path, position))
                return
            if local + size > len(window):
                window_start = position
                window = self.chunks.pread(self.chunk.chunk_id, max(size, min(WINDOW_BYTES, end - position)), position)
                local = 0
                view = memoryview(window)
            payload = view[local + HEADER_SIZE:local + size]
            if self.verify_payloads:
                try:
                    record.verify_payload(header, payload, path, position)
                except CorruptionError as error:
                    self._stop(position, error)
                    return
            if self.keep_raw:
                self.raw = view[local:local + size]
            yield position, header, payload
            position += size
            if header.record_type == RecordType.SEAL:
                self.sealed = True
                break
        self.stop_offset = position

    def _stop(self, position, error):
        self.stop_offset = position
        self.stop_error = error


def find_next_header(chunks, chunk_id, offset, end_offset):
    """The offset of the next plausible record header after `offset` (magic and header
    checksum valid), or None. Used to resynchronise after a corrupted header."""
    chunk = chunks.get(chunk_id)
    position = offset + 1
    while position < end_offset:
        window = chunks.pread(chunk_id, min(WINDOW_BYTES, end_offset - position) + HEADER_SIZE, position)
        index = window.find(record.MAGIC)
        while index != -1:
            try:
                record.decode_header(memoryview(window)[index:index + HEADER_SIZE], chunk.path, position + index)
                return position + index
            except CorruptionError:
                index = window.find(record.MAGIC, index + 1)
        position += max(1, len(window) - HEADER_SIZE)
    return None
