"""Chunk files: the table of a pool's chunks, kept in memory, and their files on disk.

A chunk file is named `chunk-<id as 16 hex digits>.cvc` and lives in one of the pool's chunk
directories (another disk may hold some of them). The table maps chunk id -> Chunk. New
chunks go to the directory with the most free space. Ids grow in allocation order, which is
the order of the log.

A chunk evicted to an object store (tiering) is `chunk-<id>.cvm` instead, a manifest
(format/evicted.py); its reads go through storage/remote_chunks.py. Where both files exist
(a crash during eviction), the local file wins.

Each chunk directory holds a label naming its pool (format/chunk_dir_label.py): a directory
without one (a disk not mounted, its mount point empty) is refused at load, never taken for
a directory whose chunks were all freed. Chunk files are published under a name that must not
exist yet, so a chunk is never written over another of the same id.
"""

import os
import re

from chunkvol.errors import AlreadyExistsError, CorruptionError, FormatError, NotFoundError
from chunkvol.format import chunk_dir_label, chunk_header, evicted
from chunkvol.storage.remote_chunks import CacheBudget, RemoteChunk, Stores

NAME = re.compile(r"^chunk-([0-9a-f]{16})\.cvc$")
MANIFEST_NAME = re.compile(r"^chunk-([0-9a-f]{16})\.cvm$")


def chunk_name(chunk_id):
    return f"chunk-{chunk_id:016x}.cvc"


def manifest_name(chunk_id):
    return f"chunk-{chunk_id:016x}.cvm"


class Chunk:
    """A chunk of the log: a local file (`fd`), or evicted (`remote`, and `fd` None)."""
    __slots__ = ("chunk_id", "path", "fd", "capacity_bytes", "size_bytes", "created_hlc", "remote")

    def __init__(self, chunk_id, path, fd, capacity_bytes, size_bytes, created_hlc, remote=None):
        self.chunk_id = chunk_id
        self.path = path
        self.fd = fd
        self.capacity_bytes = capacity_bytes
        self.size_bytes = size_bytes
        self.created_hlc = created_hlc
        self.remote = remote


class ChunkTable:
    """Every chunk of a pool, opened read-write (or read-only), indexed by id."""

    def __init__(self, files, pool_uuid, directories, capacity_bytes, writable=True):
        self.files = files
        self.pool_uuid = pool_uuid
        self.directories = list(directories)
        self.capacity_bytes = capacity_bytes
        self.writable = writable
        self.chunks = {}
        self.stores = Stores()
        self.cache_budget = CacheBudget()

    def load(self):
        """Open every chunk file in the pool's directories and check its header."""
        manifests = []
        listings = {}
        for directory in self.directories:
            if not os.path.isdir(directory):
                raise FormatError("chunk directory is missing", directory)
            listings[directory] = sorted(self.files.listdir(directory))
        self._check_labels(listings)
        for directory in self.directories:
            for name in listings[directory]:
                if name.startswith("chunk-") and name.endswith(".cvc.new") and self.writable:
                    self.files.remove(os.path.join(directory, name))
                    continue
                match = NAME.match(name)
                if match:
                    self._open(int(match.group(1), 16), os.path.join(directory, name))
                elif MANIFEST_NAME.match(name):
                    manifests.append((int(name[6:22], 16), os.path.join(directory, name)))
        for chunk_id, path in manifests:
            if chunk_id not in self.chunks:
                self._open_evicted(chunk_id, path)
        return self

    def _check_labels(self, listings):
        """Every directory must carry this pool's label. A directory without one is labelled
        when it holds this pool's chunks (a pool from before labels, or a disk that came back
        after an upgrade), or when no directory has a label yet (a pool from before labels);
        an unlabelled empty directory beside labelled ones is a disk that is not there."""
        unlabelled = []
        for directory, names in listings.items():
            if chunk_dir_label.NAME in names:
                path = os.path.join(directory, chunk_dir_label.NAME)
                if chunk_dir_label.decode(self.files.read_file(path), path) != self.pool_uuid:
                    raise FormatError("chunk directory belongs to another pool", path)
            else:
                unlabelled.append(directory)
        labelled_any = len(unlabelled) < len(listings)
        for directory in unlabelled:
            holds_chunks = any(NAME.match(name) or MANIFEST_NAME.match(name) for name in listings[directory])
            if labelled_any and not holds_chunks:
                raise NotFoundError(
                    f"chunk directory {directory} is empty and has no {chunk_dir_label.NAME}: the disk that "
                    "holds it is not mounted? The pool was not opened, so nothing is lost: mount it and open "
                    "again (a directory that really is new: copy the label from another chunk directory)")
            if self.writable:
                self.label(directory)

    def label(self, directory):
        """Write this pool's label into a chunk directory (init, or upgrading an older pool)."""
        self.files.publish(os.path.join(directory, chunk_dir_label.NAME), chunk_dir_label.encode(self.pool_uuid))

    def read_from_disk(self, first_id):
        """Local chunks from `first_id` on are read from the disk from now on, not from pages
        the kernel kept: after a failed sync those are marked clean though never written."""
        for chunk_id in self.ids():
            chunk = self.chunks[chunk_id]
            if chunk_id >= first_id and chunk.fd is not None:
                self.files.drop_cache(chunk.fd)

    def missing_between(self, first_id):
        """Chunk ids from `first_id` up to the highest present that have no file: a log with a
        hole in it (a chunk that compaction freed is always below the replay start)."""
        ids = self.ids()
        return [] if not ids else [each for each in range(first_id, ids[-1]) if each not in self.chunks]

    def missing_error(self, missing):
        names = ", ".join(chunk_name(each) for each in missing[:8]) + (" ..." if len(missing) > 8 else "")
        return NotFoundError(
            f"the log is missing chunk{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing[:8]))}"
            f"{' ...' if len(missing) > 8 else ''} ({names}), expected in one of {', '.join(self.directories)}; "
            "the log goes on after it (later chunks, or the block map, name it), so it cannot end there. The "
            "pool was not opened and nothing was changed: bring the files (or the disk holding them) back and "
            "open again")

    def _open_evicted(self, chunk_id, path):
        manifest = evicted.decode(self.files.read_file(path), path)
        if manifest.pool_uuid != self.pool_uuid:
            raise FormatError("evicted-chunk manifest belongs to another pool", path)
        if manifest.chunk_id != chunk_id:
            raise FormatError(f"manifest says chunk {manifest.chunk_id}, file name says {chunk_id}", path)
        remote = RemoteChunk(manifest, path, self.stores, self.cache_budget)
        self.chunks[chunk_id] = Chunk(chunk_id, path, None, manifest.capacity, manifest.size_bytes,
                                      manifest.created_hlc, remote)

    def evicted(self, chunk_id, manifest_path):
        """The chunk's file was replaced by a manifest (tiering): read it from the store now."""
        chunk = self.chunks.pop(chunk_id)
        self._open_evicted(chunk_id, manifest_path)
        self.files.close(chunk.fd)

    def _open(self, chunk_id, path):
        if chunk_id in self.chunks:
            raise CorruptionError(f"chunk {chunk_id} exists twice (also {self.chunks[chunk_id].path})", path)
        fd = self.files.open_write(path) if self.writable else self.files.open_read(path)
        try:
            header = self.files.pread(fd, chunk_header.DATA_OFFSET, 0)
            pool_uuid, header_id, capacity, created = chunk_header.decode(header, path)
            if pool_uuid != self.pool_uuid:
                raise FormatError("chunk file belongs to another pool", path, 16)
            if header_id != chunk_id:
                raise FormatError(f"chunk header says id {header_id}, file name says {chunk_id}", path, 32)
            size = self.files.size(fd)
            if size > capacity:
                raise CorruptionError(f"chunk file is larger ({size}) than its capacity ({capacity})", path)
        except BaseException:
            self.files.close(fd)
            raise
        self.chunks[chunk_id] = Chunk(chunk_id, path, fd, capacity, size, created)

    def ids(self):
        return sorted(self.chunks)

    def get(self, chunk_id):
        try:
            return self.chunks[chunk_id]
        except KeyError:
            raise CorruptionError(f"log refers to chunk {chunk_id}, which does not exist") from None

    def _pick_directory(self):
        def free_bytes(directory):
            stat = os.statvfs(directory)
            return stat.f_bavail * stat.f_frsize
        return max(self.directories, key=free_bytes)

    def create(self, chunk_id, created_hlc):
        """Rule 2: the header is durable, and so is the directory entry, before it is used."""
        directory = self._pick_directory()
        path = os.path.join(directory, chunk_name(chunk_id))
        temporary = path + ".new"  # a crash mid-creation leaves only this, removed at load
        if any(os.path.exists(os.path.join(each, chunk_name(chunk_id))) for each in self.directories):
            raise AlreadyExistsError(f"chunk {chunk_id} already exists ({path}): the log never writes over a chunk")
        fd = self.files.open_write(temporary, create=True)
        published = False
        try:
            self.files.pwrite(fd, chunk_header.encode(self.pool_uuid, chunk_id, self.capacity_bytes, created_hlc), 0)
            self.files.fsync(fd)
            try:
                self.files.rename(temporary, path, replace=False)
            except FileExistsError:
                raise AlreadyExistsError(f"chunk {chunk_id} already exists ({path}): the log never writes "
                                         "over a chunk") from None
            published = True
            self.files.fsync_directory(directory)
        except BaseException:
            self.files.close(fd)
            for leftover in (temporary, path) if published else (temporary,):
                try:
                    self.files.remove(leftover)
                except OSError:
                    pass
            raise
        chunk = Chunk(chunk_id, path, fd, self.capacity_bytes, chunk_header.DATA_OFFSET, created_hlc)
        self.chunks[chunk_id] = chunk
        return chunk

    def truncate(self, chunk_id, size_bytes):
        chunk = self.get(chunk_id)
        self.files.truncate(chunk.fd, size_bytes)
        self.files.fsync(chunk.fd)
        chunk.size_bytes = size_bytes

    def remove(self, chunk_id):
        """Delete a chunk (an evicted one: its manifest and cache; compaction then deletes its objects)."""
        chunk = self.chunks.pop(chunk_id)
        if chunk.remote is not None:
            chunk.remote.close()
            try:
                self.files.remove(chunk.remote.cache_path)
            except FileNotFoundError:
                pass
        else:
            self.files.close(chunk.fd)
        self.files.remove(chunk.path)
        self.files.fsync_directory(os.path.dirname(chunk.path))

    def pread(self, chunk_id, length, offset):
        chunk = self.get(chunk_id)
        if chunk.remote is not None:
            return chunk.remote.pread(length, offset)
        return self.files.pread(chunk.fd, length, offset)

    def preadv(self, chunk_id, view, offset):
        chunk = self.get(chunk_id)
        if chunk.remote is not None:
            return chunk.remote.preadv(view, offset)
        return self.files.preadv(chunk.fd, view, offset)

    def fdatasync(self, chunk_id):
        """Make a local chunk's bytes durable (an evicted one is durable in its store)."""
        chunk = self.get(chunk_id)
        if chunk.fd is not None:
            self.files.fdatasync(chunk.fd)

    def close(self):
        for chunk in self.chunks.values():
            if chunk.remote is not None:
                chunk.remote.close()
            else:
                self.files.close(chunk.fd)
        self.chunks.clear()
        self.stores.close()
