"""LogWriter: appends records to the open chunk through an in-memory tail buffer.

Random writes become sequential appends. Records are encoded straight into a preallocated
buffer (no per-request allocation) and written to the chunk file with one pwrite per buffer
fill, or on sync. Records still in the buffer are read from it, so the buffer is invisible to
readers. A failed pwrite (full disk) leaves the buffer as it was: nothing acknowledged is
dropped, the caller gets OutOfSpaceError, and a later drain retries.

Each chunk keeps room for a SEAL record. Switching chunks (rule 3 in storage/files.py):
append SEAL, drain, fdatasync, then create the next chunk; so a record in chunk N+1 proves
that all of chunk N was durable.
"""

import errno
import mmap
import threading
from concurrent.futures import ThreadPoolExecutor

from chunkvol.errors import CorruptionError, DeviceFailedError, OutOfSpaceError
from chunkvol.format import chunk_header
from chunkvol.format.record import HEADER_SIZE, RecordType, encode_header_into, encode_record_into, MAX_PAYLOAD

BUFFER_BYTES = 1 << 20
PREALLOCATE_BYTES = 64 << 20
PAGE = 4096
EMPTY = b""


class LogWriter:
    """With `direct`, the buffer goes to the file through a second, O_DIRECT descriptor:
    new log pages then skip the kernel's writeback of dirty pages, which on this machine's
    disk sustains ~450 MB/s against ~1.9 GB/s direct (docs/BENCH.md), at the price of reads
    of new data coming from the disk, not the page cache. O_DIRECT wants whole pages from
    page-aligned memory, so the buffer (an anonymous mmap, page-aligned) always begins at a
    page boundary of the file: a drain writes up to the next page boundary with the rest of
    the last page zeroed (no stale bytes that could parse as a record), and that partial
    page stays at the front of the buffer, to be written again, extended, by the next drain.
    Rewriting it cannot hurt what was durable: its old bytes are the same in both versions.

    A direct drain of a full buffer runs on a background thread while appends fill a second
    buffer (the GIL is released in pwrite), so the disk's write time overlaps the CPU work of
    the next MiB. Only one write is in flight; anything that needs the file as it is (a
    read of those bytes, sync, a chunk switch, a roll-back) waits for it first. A background
    write that fails makes the pool refuse writes (DeviceFailedError): blocks were reserved
    by fallocate before it started, so a full disk shows up before, synchronously."""

    def __init__(self, chunks, files, end_address, stamp_source, direct=False):
        """`end_address` is where the next record goes (from recovery); `stamp_source()`
        returns (origin_node, origin_sequence, hlc) for records the writer makes itself."""
        self.chunks = chunks
        self.files = files
        self.stamp_source = stamp_source
        self.direct = direct and chunks.capacity_bytes % PAGE == 0
        self.direct_fd = None
        self.buffer = mmap.mmap(-1, BUFFER_BYTES + HEADER_SIZE + MAX_PAYLOAD + 2 * PAGE)
        self.view = memoryview(self.buffer)
        self.spare = None  # the second buffer of a direct writer, made on first use
        self.inflight = None  # (future, chunk id, start offset, view, padded view, fd) of a background write
        self.executor = None
        self.room = len(self.buffer) - PAGE  # what a drain pads to a page boundary must fit
        self.zeros = memoryview(bytes(PAGE))
        self.used = 0
        chunk_id, offset = chunk_header.split_address(end_address)
        self.chunk = chunks.chunks.get(chunk_id)
        self.next_chunk_id = chunk_id if self.chunk is None else chunk_id + 1
        self.file_offset = chunk_header.DATA_OFFSET
        self.durable_address = end_address
        self.preallocated_end = 0  # chunk offset up to which blocks are reserved
        self.failure = None  # set for good by a failed write or sync (errors.DeviceFailedError)
        self.sync_lock = threading.Lock()  # one fdatasync at a time: see fdatasync
        if self.chunk is not None:
            self._start_at(offset)

    @property
    def position(self):
        """Log address of the next record."""
        if self.chunk is None:
            return chunk_header.address(self.next_chunk_id, chunk_header.DATA_OFFSET)
        return chunk_header.address(self.chunk.chunk_id, self.file_offset + self.used)

    def append(self, record_type, flags, volume_id, payload, origin_node, origin_sequence,
               hlc, offset_bytes, length_bytes, table=b""):
        """Append one record (payload = table + payload); returns its log address.
        Raises OutOfSpaceError with nothing changed."""
        size = HEADER_SIZE + len(table) + len(payload)
        if self.failure is not None:
            raise self.failure
        if self.chunk is None:
            self._open_next_chunk(hlc)
        if self.file_offset + self.used + size + HEADER_SIZE > self.chunk.capacity_bytes:
            self._seal_and_switch(hlc)
        if self.used + size > self.room:
            self.drain()
        position = self.used
        encode_record_into(self.buffer, position, record_type, flags, volume_id, payload,
                           origin_node, origin_sequence, hlc, offset_bytes, length_bytes, table)
        self.used = position + size
        log_address = chunk_header.address(self.chunk.chunk_id, self.file_offset + position)
        if self.used >= BUFFER_BYTES:
            self.drain(background=True)
        return log_address

    def drain(self, background=False):
        """Write the buffer to the chunk file (no sync). `background`: a direct writer may
        leave the write in flight (see the class notes)."""
        self._wait()
        if not self.used:
            return
        if self.failure is not None:
            raise self.failure
        used = self.used
        if self.direct_fd is None:
            end = self.file_offset + used
            if end > self.preallocated_end:
                self._preallocate(end)
            try:
                self.files.pwrite(self.chunk.fd, self.view[:used], self.file_offset)
            except OSError as error:
                self.fail(error)
            self.file_offset += used
            self.chunk.size_bytes = self.file_offset
            self.used = 0
            return
        padded = -(-used // PAGE) * PAGE
        end = self.file_offset + padded
        if end > self.preallocated_end:
            self._preallocate(end)
        self.view[used:padded] = self.zeros[:padded - used]
        whole = used - used % PAGE
        if background:
            if self.spare is None:
                self.spare = mmap.mmap(-1, len(self.buffer))
                self.executor = ThreadPoolExecutor(1, thread_name_prefix="chunkvol-log")
            future = self.executor.submit(self.files.pwrite, self.direct_fd, self.view[:padded], self.file_offset)
            self.inflight = (future, self.chunk.chunk_id, self.file_offset, self.view[:used], self.view[:padded],
                             self.direct_fd)
            written = self.view
            self.buffer, self.spare = self.spare, self.buffer
            self.view = memoryview(self.buffer)
            if whole < used:
                self.view[:used - whole] = written[whole:used]  # the partial page, to be extended
        else:
            try:
                self.files.pwrite(self.direct_fd, self.view[:padded], self.file_offset)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    self.fail(error)
                self._stop_direct()  # this filesystem wants another alignment: write through the cache
                self.drain()
                return
            if whole:
                self.view[:used - whole] = self.view[whole:used]
        self.file_offset += whole
        self.used = used - whole
        self.chunk.size_bytes = self.file_offset + self.used

    def _wait(self):
        """Finish the background write, if one is in flight."""
        if self.inflight is None:
            return
        future, chunk_id, start, view, padded_view, fd = self.inflight
        self.inflight = None
        try:
            future.result()
        except OSError as error:
            if error.errno != errno.EINVAL:
                self.fail(error)
            # This filesystem wants another alignment: from now on write through the cache.
            try:
                self.files.pwrite(self.chunks.get(chunk_id).fd, view, start)
            except (OSError, OutOfSpaceError) as again:
                self.fail(again)
            self._stop_direct()
        except OutOfSpaceError:
            # Space freed since? Try once more, here; the buffer it wrote is still intact.
            try:
                self.files.pwrite(fd, padded_view, start)
            except (OSError, OutOfSpaceError) as again:
                self.fail(again)

    def _start_at(self, offset):
        """Append from `offset` of self.chunk: in direct mode the buffer starts at the page
        boundary below, holding the bytes of that page already in the file."""
        self._wait()
        self._stop_direct()
        self.file_offset, self.used = offset, 0
        if not self.direct:
            return
        self.direct_fd = self.files.open_direct(self.chunk.path)
        if self.direct_fd is None:
            return
        head = offset % PAGE
        if head:
            self.view[:head] = self.chunks.pread(self.chunk.chunk_id, head, offset - head)
            self.file_offset, self.used = offset - head, head

    def _stop_direct(self):
        if self.inflight is not None:
            raise AssertionError("direct descriptor closed under a write in flight (a bug)")
        if self.direct_fd is not None:
            fd, self.direct_fd = self.direct_fd, None
            self.files.close(fd)

    def trim_padding(self):
        """At a clean stop in direct mode: cut the zero padding of the last page, so that the
        open chunk is exactly as long as its records and the next open has no tail to cut.
        Only when every record is durable; a lost truncate leaves padding recovery cuts."""
        if (self.direct_fd is not None and self.failure is None and self.chunk is not None
                and self.durable_address == self.position):
            end = self.file_offset + self.used
            try:
                self.files.truncate(self.chunk.fd, end)
                self.chunk.size_bytes = end
            except OSError:
                pass

    def close(self):
        inflight, self.inflight = self.inflight, None
        if inflight is not None:
            try:
                inflight[0].result()
            except BaseException:  # going away (a crash, a failed pool): a clean close synced
                pass  # first, and that sync reported any failure
        self._stop_direct()
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None

    def _preallocate(self, needed_end):
        capacity = self.chunk.capacity_bytes
        start = max(self.file_offset, self.preallocated_end)
        generous_end = min(capacity, needed_end + PREALLOCATE_BYTES)
        try:
            self.files.preallocate(self.chunk.fd, start, generous_end - start)
            self.preallocated_end = generous_end
        except OutOfSpaceError:
            self.files.preallocate(self.chunk.fd, start, needed_end - start)  # just what is needed
            self.preallocated_end = needed_end

    def sync(self):
        """Make every appended record durable; returns the durable log address."""
        if self.chunk is not None:
            self.drain()
            self.fdatasync(self.chunk.fd)
        self.durable_address = self.position
        return self.durable_address

    def fdatasync(self, fd):
        """One sync at a time, and a failure is recorded before the next begins. Linux reports
        a writeback error once per open file: of two overlapping syncs one can get EIO and the
        other 0 for the same lost pages, and the second must not be believed. A flush calls
        this without the pool lock, so the pool lock may be held while waiting here, never
        the other way round."""
        with self.sync_lock:
            if self.failure is not None:
                raise self.failure
            try:
                self.files.fdatasync(fd)
            except OSError as error:
                self.fail(error)

    def fail(self, error):
        """Refuse all further writes: after a failed write or fsync the kernel may have
        dropped our dirty pages and marked them clean, so no later sync can be believed."""
        self.failure = DeviceFailedError(
            f"the disk under the log failed ({getattr(error, 'strerror', None) or error}); the pool refuses writes until "
            "it is reopened (restart the server) and recovers from what is on disk")
        raise self.failure from error

    def read(self, log_address, length):
        """Bytes [log_address, +length) of the log, from the buffer or the chunk file."""
        chunk_id, offset = chunk_header.split_address(log_address)
        if self.inflight is not None and chunk_id == self.inflight[1] and offset + length > self.inflight[2]:
            self._wait()
        chunk = self.chunk
        if chunk is None or chunk_id != chunk.chunk_id or offset + length <= self.file_offset:
            return self.chunks.pread(chunk_id, length, offset)
        if offset >= self.file_offset:
            start = offset - self.file_offset
            return bytes(self.view[start:start + length])
        head = self.chunks.pread(chunk_id, self.file_offset - offset, offset)  # spans file and buffer
        return head + bytes(self.view[:offset + length - self.file_offset])

    def mark(self):
        """Where the log ends now, for `roll_back`."""
        chunk_id = None if self.chunk is None else self.chunk.chunk_id
        return chunk_id, self.file_offset + self.used, self.next_chunk_id

    def roll_back(self, mark):
        """Remove every record appended since `mark` (a client request that failed half way),
        from the buffer and, where some reached a file, from the file: the log is as if the
        request never came. Chunks created since are removed."""
        chunk_id, end_offset, next_chunk_id = mark
        self._wait()
        if self.chunk is not None and self.chunk.chunk_id != chunk_id:
            self._stop_direct()
        for created in [other for other in self.chunks.ids() if other >= next_chunk_id]:
            self.chunks.remove(created)
        self.next_chunk_id = next_chunk_id
        if chunk_id is None:
            self.chunk, self.used = None, 0
            return
        chunk = self.chunks.get(chunk_id)
        if self.chunk is chunk and end_offset >= self.file_offset:
            self.used = end_offset - self.file_offset
            return
        self.chunks.truncate(chunk_id, end_offset)
        self.chunk, self.preallocated_end = chunk, 0
        self._start_at(end_offset)
        self.durable_address = min(self.durable_address, self.position)

    def read_into(self, log_address, view):
        """Fill `view` with log bytes from `log_address` (no copy when they are in a file)."""
        chunk_id, offset = chunk_header.split_address(log_address)
        length = len(view)
        if self.inflight is not None and chunk_id == self.inflight[1] and offset + length > self.inflight[2]:
            self._wait()
        chunk = self.chunk
        if chunk is not None and chunk_id == chunk.chunk_id and offset + length > self.file_offset:
            view[:] = self.read(log_address, length)
            return
        if self.chunks.preadv(chunk_id, view, offset) != length:
            raise CorruptionError(f"log ends before {chunk_id}:{offset + length}")

    def _seal_and_switch(self, hlc):
        node, sequence, seal_hlc = self.stamp_source()
        position = self.used
        if position + HEADER_SIZE > self.room:
            self.drain()
            position = self.used  # a direct writer keeps its partial last page
        encode_header_into(self.buffer, position, RecordType.SEAL, 0, 0, EMPTY, node, sequence,
                           seal_hlc, 0, 0)
        self.used = position + HEADER_SIZE
        try:
            self.sync()
        except BaseException:
            self.used = position  # the chunk stays open; the next append tries again
            raise
        self._stop_direct()
        self.chunk = None
        self._open_next_chunk(hlc)

    def _open_next_chunk(self, hlc):
        try:
            self.chunk = self.chunks.create(self.next_chunk_id, hlc)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpaceError(f"no space for chunk {self.next_chunk_id}") from None
            raise
        self.next_chunk_id += 1
        self.preallocated_end = 0
        self._start_at(chunk_header.DATA_OFFSET)
