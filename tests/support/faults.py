"""A fault layer for chunkvol's file seam (chunkvol/storage/files.py): simulated power loss,
ENOSPC and EIO, all seeded.

`FaultyFiles(root, seed)` does every operation on the real files (so the pool in the test
process works as usual, page cache and all) and keeps, per file, a model of what is durable:
the content as of the file's last fsync/fdatasync, plus the writes and truncates since then
(pending). Per directory it keeps the entries as of the last directory fsync plus the
creates/renames/removes since then. A power loss (`power_loss(dest)`, or a crash at the N-th
mutating call with `crash_at=N`) writes into `dest` a pool directory as the disk could hold
it, choosing per file, from the seed, one of:

    drop      no pending write reached the disk
    keep      all of them did
    prefix    the first k did, the next one torn at a 512- or 4096-byte boundary
    reorder   each 4 KiB page of each pending write independently (a later page can be
              on disk while an earlier one is not), kept pages sometimes torn at 512 bytes
    garbage   like reorder, and the file size grew to cover all pending writes, the bytes
              nobody wrote being random

and per directory a prefix of the pending entry changes. After a failed fsync the pending
writes of that file are lost for good even though reads still see them (Linux marks the
pages clean: "fsyncgate"). Real fsyncs are skipped (durability is simulated).

The LMDB block map (POOL/index) is written by LMDB itself, not through the seam; `track_index`
snapshots data.mdb after every committed checkpoint, and the power loss puts back the last
committed one ("snapshot"), or deletes the index so the map is rebuilt from the log
("delete"), or puts back the oldest one seen ("stale": the map is a cache, any older
checkpoint must do).

`Fault` rules inject errors: `Fault("pwrite", nth=3, error=errno.ENOSPC)` fails the third
pwrite (optionally after writing part of it); `count=None` keeps failing until `clear_faults()`.
"""

import contextlib
import errno
import os
import random
import shutil

import pytest

from chunkvol.errors import OutOfSpaceError
from chunkvol.storage.files import LocalFiles

MODES = ("drop", "keep", "prefix", "reorder", "garbage")
MODE_WEIGHTS = (20, 20, 30, 20, 10)
INDEX_MODES = ("snapshot", "delete", "stale")
INDEX_WEIGHTS = (70, 20, 10)
PAGE = 4096
SECTOR = 512

# Seam methods FaultyFiles models (overrides) or knows to be harmless (reads, listings).
MODELLED = {"open_read", "open_write", "open_direct", "close", "pread", "preadv", "pwrite", "fdatasync", "fsync",
            "truncate", "size", "fsync_directory", "listdir", "remove", "rename", "read_file", "drop_cache",
            "publish", "preallocate"}


class PowerLoss(BaseException):
    """The simulated machine lost power: nothing after this reached the disk. A
    BaseException, so that `except Exception` in the code under test does not swallow it."""


class Fault:
    """Fail the `nth` call (1-based) of seam operation `op` with `error` (an errno);
    `count` calls in a row (None: until cleared). `partial`: a failing pwrite first writes
    half of its data, as a real short write before ENOSPC does."""

    def __init__(self, op, nth=1, error=errno.EIO, count=1, partial=False):
        self.op = op
        self.nth = nth
        self.error = error
        self.count = count
        self.partial = partial
        self.seen = 0
        self.fired = 0

    def triggers(self):
        self.seen += 1
        if self.seen < self.nth:
            return False
        if self.count is not None and self.fired >= self.count:
            return False
        self.fired += 1
        return True


class FileState:
    """One file (an inode): its durable content and the changes since its last sync."""

    __slots__ = ("path", "durable", "pending", "lost")

    def __init__(self, path, durable=None):
        self.path = path          # where the real file is now (None once removed)
        self.durable = durable    # bytearray, or None: not loaded yet (the real file is durable)
        self.pending = []         # ("w", offset, bytes) / ("t", size)
        self.lost = False         # a sync failed: the page cache holds pages the disk does not

    def load(self):
        if self.durable is None:
            self.durable = self._read()
        return self.durable

    def image(self):
        """The durable content, without touching it."""
        if self.durable is not None:
            return bytearray(self.durable)
        return self._read()

    def _read(self):
        # A file removed behind the seam's back (os.unlink in the code under test) reads as
        # empty: the model cannot know better, and the test should not die of it.
        try:
            with open(self.path, "rb") as handle:
                return bytearray(handle.read())
        except (FileNotFoundError, TypeError):
            return bytearray()


class DirState:
    __slots__ = ("durable", "current", "pending")

    def __init__(self, entries):
        self.durable = dict(entries)   # name -> FileState as of the last directory fsync
        self.current = dict(entries)
        self.pending = []              # ("set", name, FileState) / ("del", name)


def _apply_write(image, offset, data):
    end = offset + len(data)
    if offset > len(image):
        image.extend(bytes(offset - len(image)))
    image[offset:end] = data


def _apply_changes(image, pending):
    for change in pending:
        if change[0] == "w":
            _apply_write(image, change[1], change[2])
        else:
            _apply_truncate(image, change[1])
    return image


def _apply_truncate(image, size):
    if size < len(image):
        del image[size:]
    else:
        image.extend(bytes(size - len(image)))


class FaultyFiles(LocalFiles):
    def __init__(self, root, seed=0, crash_at=None, crash_dir=None, faults=(), modes=None,
                 index_modes=None, real_sync=False, real_preallocate=False, crash_after=None,
                 dir_changes=None):
        self.root = os.path.abspath(root)
        self.rng = random.Random(f"faulty:{seed}")
        self.crash_at = crash_at
        self.crash_dir = crash_dir
        # Crash after the N-th call (it happened), or just before it.
        self.crash_after = self.rng.random() < 0.5 if crash_after is None else crash_after
        self.faults = list(faults)
        self.modes = modes            # restrict the per-file modes (None: all, weighted)
        self.index_modes = index_modes
        self.dir_changes = dir_changes  # unsynced directory changes kept: None (seeded), "all", "none"
        self.real_sync = real_sync
        self.real_preallocate = real_preallocate
        self.calls = 0
        self.dead = False
        self.crashed = None           # description of the crash point
        self.materialized = None      # how the last power loss chose
        self.fds = {}                 # fd -> FileState (files under tracked directories)
        self.dirs = {}                # absolute directory -> DirState
        self.index_path = os.path.join(self.root, "index")
        self.index_first = self._read_index()
        self.index_last = self.index_first
        self.index_commits = 0
        chunks = os.path.join(self.root, "chunks")
        if os.path.isdir(chunks):
            self._dir(chunks)

    # ---- bookkeeping -----------------------------------------------------------------
    def _dir(self, directory):
        directory = os.path.abspath(directory)
        state = self.dirs.get(directory)
        if state is None:
            entries = {}
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if os.path.isfile(path):
                    entries[name] = FileState(path)
            state = self.dirs[directory] = DirState(entries)
        return state

    def _tracked(self, path):
        path = os.path.abspath(path)
        return path.startswith(self.root + os.sep) and not path.startswith(self.index_path + os.sep)

    def _step(self, op, what):
        """Count a mutating call; crash here if it is the chosen one; fire injected faults.
        Returns the Fault to inject, or None."""
        if self.dead:
            raise PowerLoss("the power is off")
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at and not self.crash_after:
            self._crash(f"before call {self.calls} ({op} {what})")
        for fault in self.faults:
            if fault.op == op and fault.triggers():
                return fault
        return None

    def _maybe_crash_after(self, op, what):
        if self.crash_at is not None and self.calls == self.crash_at and self.crash_after:
            self._crash(f"after call {self.calls} ({op} {what})")

    def _crash(self, where):
        self.crashed = where
        if self.crash_dir is not None:
            self.power_loss(self.crash_dir)
        self.dead = True
        raise PowerLoss(f"power lost {where}")

    def clear_faults(self):
        self.faults = []

    def _error(self, fault, path=None):
        if fault.error in (errno.ENOSPC, errno.EDQUOT):
            return OutOfSpaceError("no space left on the device holding the chunks (injected)")
        return OSError(fault.error, os.strerror(fault.error) + " (injected)", path)

    # ---- the seam --------------------------------------------------------------------
    def open_write(self, path, create=False):
        if create:
            fault = self._step("open_create", path)
            if fault is not None:
                raise self._error(fault, path)
        fd = super().open_write(path, create)
        if self._tracked(path):
            directory, name = os.path.split(os.path.abspath(path))
            state = self._dir(directory)
            if create:
                file_state = FileState(os.path.abspath(path), bytearray())
                state.current[name] = file_state
                state.pending.append(("set", name, file_state))
            else:
                file_state = state.current.get(name)
                if file_state is None:
                    file_state = state.current[name] = FileState(os.path.abspath(path))
                    state.durable[name] = file_state
            self.fds[fd] = file_state
        if create:
            self._maybe_crash_after("open_create", path)
        return fd

    def open_read(self, path):
        fd = super().open_read(path)
        return fd

    def open_direct(self, path):
        """The writer's O_DIRECT descriptor: modelled as a plain one on the same file (same
        durability rules); real alignment is exercised by the tests on LocalFiles."""
        fd = super().open_write(path)
        if self._tracked(path):
            directory, name = os.path.split(os.path.abspath(path))
            state = self._dir(directory)
            file_state = state.current.get(name)
            if file_state is None:
                file_state = state.current[name] = FileState(os.path.abspath(path))
                state.durable[name] = file_state
            self.fds[fd] = file_state
        return fd

    def close(self, fd):
        self.fds.pop(fd, None)
        super().close(fd)

    def pwrite(self, fd, data, offset):
        file_state = self.fds.get(fd)
        fault = self._step("pwrite", file_state.path if file_state else fd)
        data = bytes(data)
        if fault is not None:
            if fault.partial and len(data) > 1:
                half = data[:len(data) // 2]
                self._record_write(file_state, half, offset)
                super().pwrite(fd, half, offset)
            raise self._error(fault)
        self._record_write(file_state, data, offset)
        super().pwrite(fd, data, offset)
        self._maybe_crash_after("pwrite", offset)

    def _record_write(self, file_state, data, offset):
        if file_state is not None:
            file_state.load()
            file_state.pending.append(("w", offset, data))

    def _sync(self, op, fd):
        file_state = self.fds.get(fd)
        fault = self._step(op, file_state.path if file_state else fd)
        if fault is not None:
            if file_state is not None:
                file_state.load()
                file_state.pending = []  # fsyncgate: the pages are clean now, the data is not on disk
                file_state.lost = True
            raise self._error(fault)
        if self.real_sync:
            (os.fsync if op == "fsync" else os.fdatasync)(fd)
        if file_state is not None and file_state.pending:
            _apply_changes(file_state.load(), file_state.pending)
            file_state.pending = []
        self._maybe_crash_after(op, fd)

    def fdatasync(self, fd):
        self._sync("fdatasync", fd)

    def drop_cache(self, fd):
        """The kernel forgets the file's clean cached pages: after a failed sync, reads show
        what the disk holds (the durable image, plus writes made since, still dirty)."""
        file_state = self.fds.get(fd)
        if file_state is not None and file_state.lost:
            content = _apply_changes(file_state.image(), file_state.pending)
            os.ftruncate(fd, len(content))
            os.pwrite(fd, content, 0)
            file_state.lost = False
        super().drop_cache(fd)

    def fsync(self, fd):
        self._sync("fsync", fd)

    def truncate(self, fd, length):
        file_state = self.fds.get(fd)
        fault = self._step("truncate", file_state.path if file_state else fd)
        if fault is not None:
            raise self._error(fault)
        if file_state is not None:
            file_state.load()
            file_state.pending.append(("t", length))
        super().truncate(fd, length)
        self._maybe_crash_after("truncate", length)

    def preallocate(self, fd, offset, length):
        """Reserves blocks, changes no content and no size: only a place to inject ENOSPC."""
        if self.dead:
            raise PowerLoss("the power is off")
        for fault in self.faults:
            if fault.op == "preallocate" and fault.triggers():
                raise self._error(fault)
        parent = getattr(super(), "preallocate", None)
        if parent is not None and self.real_preallocate:
            parent(fd, offset, length)

    def fsync_directory(self, path):
        fault = self._step("fsync_directory", path)
        if fault is not None:
            raise self._error(fault, path)
        if self.real_sync:
            super().fsync_directory(path)
        if self._tracked(os.path.join(path, "x")):
            state = self._dir(path)
            state.durable = dict(state.current)
            state.pending = []
        self._maybe_crash_after("fsync_directory", path)

    def listdir(self, path):
        if self._tracked(os.path.join(path, "x")):
            self._dir(path)
        return super().listdir(path)

    def remove(self, path):
        fault = self._step("remove", path)
        if fault is not None:
            raise self._error(fault, path)
        if self._tracked(path):
            directory, name = os.path.split(os.path.abspath(path))
            state = self._dir(directory)
            file_state = state.current.pop(name, None)
            if file_state is not None:
                file_state.load()
                file_state.path = None
            state.pending.append(("del", name))
        super().remove(path)
        self._maybe_crash_after("remove", path)

    def rename(self, source, target, replace=True):
        fault = self._step("rename", target)
        if fault is not None:
            raise self._error(fault, target)
        if not replace and os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)
        if self._tracked(source) and self._tracked(target):
            source_dir, source_name = os.path.split(os.path.abspath(source))
            target_dir, target_name = os.path.split(os.path.abspath(target))
            source_state = self._dir(source_dir)
            target_state = self._dir(target_dir)
            file_state = source_state.current.pop(source_name, None)
            if file_state is None:
                file_state = FileState(os.path.abspath(source))
            source_state.pending.append(("del", source_name))
            replaced = target_state.current.get(target_name)
            if replaced is not None:
                replaced.load()
                replaced.path = None
            file_state.path = os.path.abspath(target)
            target_state.current[target_name] = file_state
            target_state.pending.append(("set", target_name, file_state))
        super().rename(source, target, replace)
        self._maybe_crash_after("rename", target)

    # ---- the index (LMDB, outside the seam) ------------------------------------------
    def _read_index(self):
        path = os.path.join(self.index_path, "data.mdb")
        if not os.path.exists(path):
            return None
        with open(path, "rb") as handle:
            return handle.read()

    def index_committed(self):
        """Called after the block map committed a checkpoint: that data.mdb is durable."""
        if not self.dead:
            self.index_last = self._read_index()
            self.index_commits += 1

    # ---- power loss ------------------------------------------------------------------
    def _choose(self, options, weights):
        return self.rng.choices(options, weights)[0]

    def power_loss(self, dest):
        """Write the pool directory as a power loss now could leave it into `dest` (which
        must not exist). Returns a dict describing the choices made."""
        rng = self.rng
        choices = {"files": {}, "dirs": {}, "index": None, "crashed": self.crashed}
        os.makedirs(dest)
        tracked = set(self.dirs)
        for name in os.listdir(self.root):
            source = os.path.join(self.root, name)
            if name in ("lock", "index") or source in tracked or any(t.startswith(source + os.sep) for t in tracked):
                continue
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(dest, name))
            elif os.path.isfile(source):
                shutil.copy2(source, os.path.join(dest, name))
        for directory, state in sorted(self.dirs.items()):
            relative = os.path.relpath(directory, self.root)
            target_dir = os.path.join(dest, relative)
            os.makedirs(target_dir, exist_ok=True)
            entries = dict(state.durable)
            if self.dir_changes == "all":
                keep = len(state.pending)
            elif self.dir_changes == "none":
                keep = 0
            else:
                keep = rng.randint(0, len(state.pending)) if state.pending else 0
            for change in state.pending[:keep]:
                if change[0] == "set":
                    entries[change[1]] = change[2]
                else:
                    entries.pop(change[1], None)
            if state.pending:
                choices["dirs"][relative] = f"{keep}/{len(state.pending)} entry changes"
            for name, file_state in sorted(entries.items()):
                mode, image = self._file_image(file_state)
                if mode is not None:
                    choices["files"][os.path.join(relative, name)] = mode
                with open(os.path.join(target_dir, name), "wb") as handle:
                    handle.write(image)
        index_mode = self._choose(self.index_modes or INDEX_MODES,
                                  None if self.index_modes else INDEX_WEIGHTS)
        data = {"snapshot": self.index_last, "stale": self.index_first, "delete": None}[index_mode]
        if data is not None:
            os.makedirs(os.path.join(dest, "index"))
            with open(os.path.join(dest, "index", "data.mdb"), "wb") as handle:
                handle.write(data)
        choices["index"] = index_mode if data is not None or index_mode == "delete" else f"{index_mode} (none yet)"
        self.materialized = choices
        return choices

    def _file_image(self, file_state):
        """(mode or None, bytes) of one file after the power loss."""
        image = file_state.image()
        pending = file_state.pending
        if not pending:
            return None, image
        rng = self.rng
        mode = self._choose(self.modes or MODES, None if self.modes else MODE_WEIGHTS)
        if mode == "keep":
            for change in pending:
                self._apply(image, change)
        elif mode == "prefix":
            keep = rng.randint(0, len(pending))
            for change in pending[:keep]:
                self._apply(image, change)
            if keep < len(pending) and pending[keep][0] == "w":
                _, offset, data = pending[keep]
                unit = rng.choice((SECTOR, PAGE))
                cuts = [c for c in range((offset // unit + 1) * unit, offset + len(data), unit)]
                if cuts:
                    cut = rng.choice(cuts)
                    _apply_write(image, offset, data[:cut - offset])
                    mode = f"prefix {keep}/{len(pending)} torn at {cut}"
                else:
                    mode = f"prefix {keep}/{len(pending)}"
            else:
                mode = f"prefix {keep}/{len(pending)}"
        elif mode in ("reorder", "garbage"):
            if mode == "garbage":
                end = max([len(image)] + [c[1] + len(c[2]) for c in pending if c[0] == "w"])
                if end > len(image):
                    image.extend(rng.randbytes(end - len(image)))
            kept = total = 0
            for change in pending:
                if change[0] == "t":
                    if rng.random() < 0.5:
                        self._apply(image, change)
                    continue
                _, offset, data = change
                position = offset
                end = offset + len(data)
                while position < end:
                    page_end = min(end, (position // PAGE + 1) * PAGE)
                    total += 1
                    if rng.random() < 0.5:
                        kept += 1
                        piece_end = page_end
                        if rng.random() < 0.2 and page_end - position > SECTOR:
                            sectors = [s for s in range((position // SECTOR + 1) * SECTOR, page_end, SECTOR)]
                            if sectors:
                                piece_end = rng.choice(sectors)
                        _apply_write(image, position, data[position - offset:piece_end - offset])
                    position = page_end
            mode = f"{mode} {kept}/{total} pages"
        else:
            mode = f"drop {len(pending)}"
        return mode, image

    @staticmethod
    def _apply(image, change):
        if change[0] == "w":
            _apply_write(image, change[1], change[2])
        else:
            _apply_truncate(image, change[1])


_TRACKED = []


@contextlib.contextmanager
def track_index(faulty):
    """While active, every committed block-map checkpoint of `faulty`'s pool is recorded
    (BlockMap.checkpoint is wrapped for the duration; LMDB does not go through the seam)."""
    from chunkvol.index import blockmap as blockmap_module
    cls = blockmap_module.BlockMap
    original = cls.checkpoint
    index_path = os.path.realpath(faulty.index_path)

    def checkpoint(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if os.path.realpath(self.path) == index_path:
            faulty.index_committed()
        return result

    cls.checkpoint = checkpoint
    try:
        yield faulty
    finally:
        cls.checkpoint = original


def abandon(pool):
    """Drop an open Pool the way a crash does: no drain, no flush, no checkpoint; only its
    file descriptors, LMDB environment and lock are let go (the process would lose them)."""
    writer = getattr(pool, "writer", None)
    if writer is not None and hasattr(writer, "used"):
        writer.used = 0  # the tail buffer is process memory
    release = getattr(pool, "_release", None)
    if release is not None:
        release()
    else:  # pragma: no cover (in case the pool's internals change)
        if getattr(pool, "blockmap", None) is not None:
            pool.blockmap.close()
        if getattr(pool, "chunks", None) is not None:
            for chunk in pool.chunks.chunks.values():
                os.close(chunk.fd)
        if getattr(pool, "lock_fd", None) is not None:
            os.close(pool.lock_fd)
    pool.closed = True


def unmodelled_seam_methods():
    """Public LocalFiles methods that FaultyFiles neither overrides nor knows to be harmless:
    a new seam method that writes would escape the power-loss model."""
    names = {name for name in dir(LocalFiles) if not name.startswith("_") and callable(getattr(LocalFiles, name))}
    return sorted(names - MODELLED)


def make_pool(path, chunk_size=16 << 20, volume_size=64 << 20, compression="none", name="disk0",
              chunk_dirs=None, cache="writeback"):
    """A pool with one volume, made in-process (no CLI), closed cleanly."""
    from chunkvol.pool import Pool
    Pool.create(path, chunk_size=chunk_size, chunk_dirs=chunk_dirs, cache=cache)
    with Pool.open(path) as pool:
        pool.create_volume(name, volume_size, compression)
    return str(path)


@pytest.fixture
def scratch(tmp_path):
    """A scratch directory on tmpfs (/dev/shm) when there is one: simulated power losses
    copy pools around and LMDB fsyncs each commit, which a disk makes slow. Removed after."""
    base = "/dev/shm"
    if os.path.isdir(base) and os.access(base, os.W_OK):
        import tempfile
        path = tempfile.mkdtemp(prefix="chunkvol-faults-", dir=base)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield str(tmp_path)
