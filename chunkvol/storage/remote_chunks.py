"""Reading chunks that were evicted to an object store (tiering), through a local cache.

An evicted chunk keeps its manifest (format/evicted.py) where its file was. A read fetches
the 1 MiB units it covers from the store with ranged reads, checks each against the
manifest's hash, and keeps it in a sparse cache file beside the manifest (`chunk-<id>.cache`)
for the next read. A unit read back from the cache is checked the same way the first time
this process reads it (later reads take just the bytes asked for: the records' own checksums
still cover them), so a cache left half-written by a crash, or damaged, is simply fetched
again: the cache needs no bookkeeping on disk. Its size is bounded by CACHE_BYTES per process: the least recently used units are
punched out of their files, and a cache file found larger than the bound at open is emptied.

The store is opened at the first miss and shared by every evicted chunk of the table (for a
chunk evicted to an encrypted mirror, through its key: the manifest names the key file and
its fingerprint, and each unit is opened and authenticated before its hash is even checked); its
faults (unreachable after retries, access denied, a unit that fails its hash) reach the
reader as errors, never as data.
"""

import ctypes
import ctypes.util
import os
from collections import OrderedDict

from chunkvol import objstore
from chunkvol.errors import CorruptionError, NotFoundError
from chunkvol.format import evicted
from chunkvol.objstore.keys import load_key
from chunkvol.objstore.sealed_store import SealedStore

CACHE_BYTES = 1 << 30
# A client waits on a read of an evicted chunk (and, served one request at a time, every other
# client with it): a store that is away is given up after this, and the read is EIO.
READ_RETRY_SECONDS = 5.0
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class Stores:
    """Object-store handles by URL, opened when first needed, shared by a chunk table."""

    def __init__(self):
        self.open = {}

    def get(self, url, key_path=None, key_fingerprint=None):
        """The store at `url`, sealed with the key in `key_path` (checked against
        `key_fingerprint`) when one is given."""
        store = self.open.get((url, key_path))
        if store is None:
            key = load_key(key_path, key_fingerprint) if key_path is not None else None
            store = objstore.open_store(url, min(READ_RETRY_SECONDS, objstore.RETRY_SECONDS))
            if key is not None:
                store = SealedStore(store, key)
            self.open[(url, key_path)] = store
        return store

    def close(self):
        for store in self.open.values():
            store.close()
        self.open.clear()


class CacheBudget:
    """Least recently used cached units across a process's evicted chunks."""

    def __init__(self, limit_bytes=CACHE_BYTES):
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self.units = OrderedDict()  # (remote chunk, unit) -> bytes

    def touch(self, chunk, unit, size):
        key = (chunk, unit)
        if key in self.units:
            self.units.move_to_end(key)
            return
        self.units[key] = size
        self.used_bytes += size
        while self.used_bytes > self.limit_bytes and len(self.units) > 1:
            (old_chunk, old_unit), old_size = self.units.popitem(last=False)
            self.used_bytes -= old_size
            old_chunk.punch(old_unit)

    def forget(self, chunk):
        for key in [key for key in self.units if key[0] is chunk]:
            self.used_bytes -= self.units.pop(key)


class RemoteChunk:
    """The read side of one evicted chunk: pread and preadv as a chunk file offers them."""

    def __init__(self, manifest, manifest_path, stores, budget):
        self.manifest = manifest
        self.manifest_path = manifest_path
        self.cache_path = manifest_path[:-len(".cvm")] + ".cache"
        self.stores = stores
        self.budget = budget
        self.cache_fd = None
        self.fetches = 0
        self.verified = set()  # units checked in the cache file by this process: read without re-hashing

    def _cache(self):
        if self.cache_fd is None:
            try:
                fd = os.open(self.cache_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                return None  # no cache (a read-only directory): every read fetches
            if os.fstat(fd).st_blocks * 512 > self.budget.limit_bytes:
                os.ftruncate(fd, 0)  # left by an earlier process: start empty rather than over the bound
            self.cache_fd = fd
        return self.cache_fd

    def punch(self, unit):
        self.verified.discard(unit)
        if self.cache_fd is not None:
            size = self.manifest.unit_bytes
            _libc.fallocate(self.cache_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, unit * size, size)

    def _unit(self, index):
        manifest = self.manifest
        start = index * manifest.unit_bytes
        length = min(manifest.unit_bytes, manifest.size_bytes - start)
        expected = manifest.unit_hashes[index]
        fd = self._cache()
        if fd is not None:
            data = os.pread(fd, length, start)
            if len(data) == length and evicted.hash_unit(data) == expected:
                self.budget.touch(self, index, length)
                self.verified.add(index)
                return data
        piece = start // manifest.piece_bytes
        name = manifest.piece_name(piece)
        try:
            store = self.stores.get(manifest.store_url, manifest.key_path, manifest.key_fingerprint)
            data = store.get(name, start - piece * manifest.piece_bytes, length)
        except NotFoundError:
            raise CorruptionError(f"evicted chunk {manifest.chunk_id}: object {name} is missing from "
                                  f"{manifest.store_url}", self.manifest_path) from None
        self.fetches += 1
        if len(data) != length or evicted.hash_unit(data) != expected:
            raise CorruptionError(f"evicted chunk {manifest.chunk_id}: bytes {start}+{length} from "
                                  f"{manifest.store_url} ({name}) fail their checksum", self.manifest_path)
        if fd is not None:
            try:
                os.pwrite(fd, data, start)
                self.budget.touch(self, index, length)
                self.verified.add(index)
            except OSError:
                pass  # a full cache disk only costs the next read a fetch
        return data

    def pread(self, length, offset):
        end = min(offset + length, self.manifest.size_bytes)
        if offset >= end:
            return b""
        unit_bytes = self.manifest.unit_bytes
        first, last = offset // unit_bytes, (end - 1) // unit_bytes
        if first == last and first in self.verified:
            # Checked when it came in: read just the bytes asked for (a record's own checksums
            # still cover them).
            data = os.pread(self.cache_fd, end - offset, offset)
            if len(data) == end - offset:
                self.budget.touch(self, first, min(unit_bytes, self.manifest.size_bytes - first * unit_bytes))
                return data
            self.verified.discard(first)
        if first == last:
            data = self._unit(first)
        else:
            data = b"".join(self._unit(index) for index in range(first, last + 1))
        start = offset - first * unit_bytes
        return data[start:start + end - offset]

    def preadv(self, view, offset):
        data = self.pread(len(view), offset)
        view[:len(data)] = data
        return len(data)

    def close(self):
        self.budget.forget(self)
        self.verified.clear()
        if self.cache_fd is not None:
            os.close(self.cache_fd)
            self.cache_fd = None
