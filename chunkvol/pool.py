"""Pool: one node's storage: `pool.json`, chunk files, the block map, and the open log.

Layout of a pool directory:

    pool.json        pool metadata (format/pool_metadata.py)
    lock             held (flock) by the one process that has the pool open for writing
    chunks/          chunk files (format/chunk_header.py, format/record.py); more
                     directories, on other disks, may be listed in pool.json
    index/           LMDB block map and volume table: a cache, rebuilt from the log if lost

Every change is a record appended to the log first; the in-memory state (volumes, block map
overlay) is then changed by the same `_apply_*` code that replays the log at open, so what a
pool shows after a crash is what the log says. One lock serialises the pool's state; nbdkit's
threads take it per request.
"""

import contextlib
import json
import os
import re
import threading
import time
import uuid
from datetime import datetime, timezone

import lmdb
import zstandard

from chunkvol import compaction, history, locks
from chunkvol.clock import MAX_NODES, NODE_MASK, HybridClock, node_index, node_index_of
from chunkvol.errors import (AlreadyExistsError, ChunkvolError, CorruptionError, NotFoundError,
                             OutOfRangeError, OutOfSpaceError, PoolBusyError, ReadOnlyError, UsageError)
from chunkvol.format import chunk_dir_label, chunk_header, pool_metadata
from chunkvol.format import group_map
from chunkvol.format.checkpoint import Checkpoint
from chunkvol.format.record import (BLOCK_SIZE, FLAG_ZSTD, GROUP_BLOCKS, HEADER_SIZE, RecordType, commit_seen,
                                    encode_commit)
from chunkvol.index.blockmap import BlockMap
from chunkvol.index.tombstones import Tombstones
from chunkvol.mirror.config import peer_nodes
from chunkvol.log.recovery import recover
from chunkvol.log.writer import LogWriter
from chunkvol.storage.chunks import ChunkTable
from chunkvol.storage.files import LocalFiles

DEFAULT_CHUNK_SIZE = 8 << 30
VOLUME_MODES = ("single-primary", "multi-master")
HEARTBEAT_SECONDS = 1.0
VOLUME_ID_NODE_SHIFT = 24  # a volume id's top bits are the creating node's index: no two nodes pick one id
CHECKPOINT_GROUPS = 16384      # unsaved group versions that force a checkpoint (memory bound)
AUTO_FLUSH_GROUPS = 16384      # unsealed groups that force a flush point (1 GiB of data)
AUTO_FLUSH_BYTES = 16 << 20    # bytes written since the last flush point that force one (a mirror's
                               # batch is whole flush intervals: with a 32 MiB request it stays < 64 MiB)
CHECKPOINT_SECONDS = 30.0
VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
COMPRESSIONS = ("none", "zstd")
MAX_VOLUME_BYTES = 1 << 50


def validate_volume_name(name):
    if not isinstance(name, str) or not VOLUME_NAME.match(name):
        raise UsageError(f"invalid volume name {name!r}: use letters, digits, '.', '_', '+', '-' "
                         "(up to 128, starting with a letter or digit)")
    return name


class VolumeInfo:
    __slots__ = ("volume_id", "name", "size_bytes", "compression", "created_hlc", "parent", "retained_from",
                 "detail_from", "mode", "primaries", "split_brain", "discards")

    def __init__(self, volume_id, name, size_bytes, compression, created_hlc, parent=None, retained_from=0,
                 detail_from=0, mode=None, primaries=(), split_brain=(), discards=()):
        self.volume_id = volume_id
        self.name = name
        self.size_bytes = size_bytes
        self.compression = compression
        self.created_hlc = created_hlc
        self.parent = parent  # a clone: {"id", "stamp", "snapshot"} of what it was cloned from
        self.retained_from = retained_from  # stamp: the oldest point still readable (pruning)
        self.detail_from = detail_from  # stamp: every flush point after it is kept
        self.mode = mode  # None (one writing node), "multi-master" or "single-primary"
        self.primaries = sorted(tuple(pair) for pair in primaries)  # single-primary: [(stamp, node)]
        self.split_brain = [dict(event) for event in split_brain]  # writes made by a node not primary then
        # An old primary's writes its successor had not received when promoted: left out of the
        # volume on every node ({"node", "after", "before"} stamps), as DRBD discards them.
        self.discards = [dict(event) for event in discards]

    def discarded(self, node, stamp):
        for event in self.discards:
            if event["node"] == node and event["after"] < stamp < event["before"]:
                return True
        return False

    def primary(self, at=None):
        """The single-primary volume's writer (at a stamp), or None."""
        found = None
        for stamp, node in self.primaries:
            if at is not None and stamp > at:
                break
            found = node
        return found

    @classmethod
    def from_dict(cls, info):
        return cls(info["id"], info["name"], info["size"], info["compression"], info["created_hlc"],
                   info.get("parent"), info.get("retained_from", 0), info.get("detail_from", 0),
                   info.get("mode"), info.get("primaries", ()), info.get("split_brain", ()),
                   info.get("discards", ()))

    def as_dict(self):
        info = {"id": self.volume_id, "name": self.name, "size": self.size_bytes,
                "compression": self.compression, "created_hlc": self.created_hlc}
        if self.parent:
            info["parent"] = self.parent
        if self.retained_from:
            info["retained_from"] = self.retained_from
            info["detail_from"] = self.detail_from
        if self.mode:
            info["mode"] = self.mode
            if self.primaries:
                info["primaries"] = [list(pair) for pair in self.primaries]
                info["primary"] = self.primary()
            if self.split_brain:
                info["split_brain"] = self.split_brain
            if self.discards:
                info["discards"] = self.discards
        return info


CACHE_MODES = ("writeback", "none")


class Pool:
    """An opened pool. Use `Pool.create` then `Pool.open`; close it (or use `with`)."""

    def __init__(self, path, fields, files, readonly, index_path=None, cache=None):
        self.path = path
        self.index_path = index_path or os.path.join(path, "index")
        # A read-only pool may still build a block map of its own elsewhere (`check`).
        self.index_writable = not readonly or index_path is not None
        self.fields = fields
        self.files = files
        self.readonly = readonly
        self.pool_uuid = bytes.fromhex(fields["pool_uuid"])
        self.node_id = fields["node_id"]
        self.chunk_size = fields["chunk_size"]
        self.chunk_dirs = [os.path.join(path, d) for d in fields["chunk_dirs"]]
        self.cache = cache or fields.get("cache", "writeback")
        self.role = fields.get("role", "primary")
        self.lock = threading.RLock()
        self.clock = HybridClock(index=node_index(self.node_id))
        self.volumes = {}
        self.volumes_by_id = {}
        self.snapshots = {}  # volume_id -> {name: {"name", "stamp", "size", "created"}}
        self.users = {}  # volume name -> (open NBD connections to it or its points, to it live)
        self.points_read = {}  # volume_id -> {stamp: open connections reading the volume as of it}
        self.next_sequence = 1
        self.origins = {}  # other node -> greatest origin sequence of its records in our log
        self.origin_stamps = {}  # other node -> stamp of its last COMMIT in our log
        self.tombstones = Tombstones()  # stamped holes, while a peer's older record may still come
        # volume id -> stamp of its VOLUME_REMOVE: another node's records of it that arrive
        # later (written while apart) are taken and dropped, not refused as forged
        self.removed_volumes = {}
        self.peer_nodes = frozenset()  # node ids of this pool's peers (multi-master), from mirrors.json
        self.peer_seen = {}  # peer -> {node: stamp} it had seen at its last COMMIT that reached us
        self.next_volume_id = (node_index(self.node_id) << VOLUME_ID_NODE_SHIFT) | 1
        self.records_replayed = 0
        self._replayed_now = 0
        self.damage = []
        self.compressor = zstandard.ZstdCompressor(level=1, write_content_size=True)
        self.decompressor = zstandard.ZstdDecompressor()
        self.last_checkpoint_time = self.last_retention_time = time.monotonic()
        self.lock_fd = None
        self.chunks = None
        self.blockmap = None
        self.writer = None
        self.closed = False
        self.recovery = None
        self.committed_address = None  # log position just after our last COMMIT record
        self.committed_stamp = 0  # stamp of the last flush point
        self.own_commit_time = 0.0  # wall time of this node's last COMMIT (heartbeats count from it)
        self.notes = []  # things a user should know about this open (status shows them)

    # ---- creating and opening -----------------------------------------------------
    @classmethod
    def create(cls, path, chunk_size=DEFAULT_CHUNK_SIZE, chunk_dirs=None, files=None, node_id=None,
               cache="writeback", pool_uuid=None, mirror_of=None):
        """`pool_uuid` and `mirror_of` (the source's node id) make a mirror of another pool."""
        files = files or LocalFiles()
        path = os.path.abspath(path)
        if os.path.exists(os.path.join(path, "pool.json")):
            raise AlreadyExistsError(f"a pool already exists at {path}")
        if not chunk_header.MIN_CAPACITY <= chunk_size <= chunk_header.MAX_CAPACITY // 2:
            raise UsageError("chunk size must be between 16M and 512G")
        if chunk_size % BLOCK_SIZE:
            raise UsageError("chunk size must be a multiple of 4096")
        if cache not in CACHE_MODES:
            raise UsageError(f"cache must be one of {', '.join(CACHE_MODES)}")
        try:
            os.makedirs(path, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UsageError(f"cannot create a pool at {path}: a file is in the way") from None
        pool_uuid = pool_uuid or uuid.uuid4().bytes
        directories = []
        for directory in chunk_dirs or ["chunks"]:
            absolute = os.path.join(path, directory)
            try:
                os.makedirs(absolute, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise UsageError(f"cannot create chunk directory {absolute}: a file is in the way") from None
            files.publish(os.path.join(absolute, chunk_dir_label.NAME), chunk_dir_label.encode(pool_uuid))
            directories.append(directory if not os.path.isabs(directory) else absolute)
        fields = {
            "pool_uuid": pool_uuid.hex(),
            # A founding node has index 0 (clock.py); joined nodes and mirrors get others.
            "node_id": node_id or ((int.from_bytes(os.urandom(4), "little") & ~NODE_MASK) or MAX_NODES),
            "chunk_size": chunk_size,
            "chunk_dirs": directories,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if cache != "writeback":
            fields["cache"] = cache
        if mirror_of is not None:
            fields["role"], fields["mirror_of"] = "mirror", mirror_of
        files.publish(os.path.join(path, "pool.json"), pool_metadata.encode(fields))
        return path

    @classmethod
    def read_metadata(cls, path, files=None):
        files = files or LocalFiles()
        metadata_path = os.path.join(os.path.abspath(path), "pool.json")
        if not os.path.exists(metadata_path):
            raise NotFoundError(f"no pool at {os.path.abspath(path)} (run `chunkvol --pool {path} init`)")
        return pool_metadata.decode(files.read_file(metadata_path), metadata_path)

    @classmethod
    def open(cls, path, readonly=False, files=None, index_path=None, cache=None, wall=None):
        """Open a pool. `readonly`: no lock, nothing written to the log (a server may be
        running). `index_path`: build the block map there instead of POOL/index. `cache`:
        "writeback" (log writes go through the page cache) or "none" (O_DIRECT, as qemu's
        cache=none); None takes the pool's setting (pool.json "cache", default writeback).
        `wall`: the wall clock in ns (a simulation's; default time.time_ns)."""
        files = files or LocalFiles()
        path = os.path.abspath(path)
        if cache not in (None,) + CACHE_MODES:
            raise UsageError(f"cache must be one of {', '.join(CACHE_MODES)}")
        pool = cls(path, cls.read_metadata(path, files), files, readonly, index_path, cache)
        if wall is not None:
            pool.clock.wall = wall
        try:
            pool._open()
        except BaseException:
            pool._release()
            raise
        return pool

    def _open(self):
        if not self.readonly:
            self._take_lock()
        self.chunks = ChunkTable(self.files, self.pool_uuid, self.chunk_dirs, self.chunk_size,
                                 writable=not self.readonly).load()
        index_path = self.index_path
        if not self.index_writable and not os.path.exists(os.path.join(index_path, "data.mdb")):
            raise NotFoundError("the pool has no block map yet; open it read-write once to build it")
        checkpoint = self._open_blockmap(index_path)
        if checkpoint is None and self.chunks.ids():
            # A rebuild. Chunks that compaction freed are summarized by a base in the log.
            checkpoint = compaction.load_base(self)
            if checkpoint is None and self.chunks.ids()[0] != 1:
                raise CorruptionError(f"the log starts at chunk {self.chunks.ids()[0]} (earlier ones were compacted "
                                      "away) and no complete base summary of them is readable", self.path)
        if checkpoint is None:
            first = self.chunks.ids()[0] if self.chunks.ids() else 1
            start = chunk_header.address(first, chunk_header.DATA_OFFSET)
        else:
            start = checkpoint.log_address
            self.next_sequence = checkpoint.next_origin_sequence
            self.clock.observe(checkpoint.max_hlc)
            if checkpoint.next_volume_id >> VOLUME_ID_NODE_SHIFT == node_index(self.node_id):
                self.next_volume_id = checkpoint.next_volume_id  # else: ids of an older pool; ours come from our space
            self.records_replayed = checkpoint.records_replayed
            self.origins = self.blockmap.read_origins()
            self.origin_stamps = self.blockmap.read_origin_stamps()
            self.tombstones = Tombstones(self.blockmap.read_tombstones())
            self.removed_volumes = self.blockmap.read_removed_volumes()
        self.peer_nodes = peer_nodes(self.path, self.files)
        for info in self.blockmap.stored_volumes():
            self._add_volume(VolumeInfo.from_dict(info), persist=False)
        for volume_id, snapshot in self.blockmap.stored_snapshots():
            self.snapshots.setdefault(volume_id, {})[snapshot["name"]] = snapshot
        result = recover(self.chunks, start, self._apply_replayed, writable=not self.readonly,
                         volume_sizes=lambda: {v.volume_id: v.size_bytes for v in self.volumes.values()},
                         local_node=self.node_id)
        self.damage = result.damage
        self.recovery = result
        self.records_replayed += self._replayed_now
        self.writer = LogWriter(self.chunks, self.files, result.end_address, self._next_stamp,
                                direct=not self.readonly and self.cache == "none")
        self.committed_stamp = max(self.committed_stamp, self.clock.last)  # every version is at or before it
        if not (result.records_applied or result.requests_discarded or checkpoint is None):
            self.committed_address = result.end_address  # the checkpoint is the log's end: nothing to seal
        if not self.readonly and (result.records_applied or result.requests_discarded or checkpoint is None):
            try:
                self._flush_locked()
                self._checkpoint_locked()
            except OutOfSpaceError as error:
                # The replayed state is in memory and the log is intact: serve and read on;
                # writes fail with ENOSPC until space returns, and the next open replays again.
                self.notes.append(f"not checkpointed at open: {error}")

    def _open_blockmap(self, index_path):
        """Open the block map and read its checkpoint. It is a cache: when it is damaged (not
        LMDB, cut short, a checkpoint that fails its checksum or names another pool) a writable
        open sets it aside as index.damaged-<time> and rebuilds it from the log."""
        try:
            self.blockmap = BlockMap(index_path, readonly=not self.index_writable)
            checkpoint = self.blockmap.read_checkpoint()
            if checkpoint is not None and checkpoint.pool_uuid != self.pool_uuid:
                raise CorruptionError("the block map belongs to another pool", index_path)
            return checkpoint
        except (CorruptionError, lmdb.Error) as error:
            if self.blockmap is not None:
                self.blockmap.close()
                self.blockmap = None
            if self.readonly:
                raise CorruptionError(f"{error}; open the pool read-write (or `chunkvol check --repair`) "
                                      "to rebuild the block map from the log") from None
            aside = f"{index_path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            os.rename(index_path, aside)
            self.damage.append(CorruptionError(f"block map set aside as {aside} and rebuilt from the log: {error}"))
            self.blockmap = BlockMap(index_path)
            return None

    def _take_lock(self):
        self.lock_fd = take_pool_lock(self.path)

    def _release(self):
        if self.writer is not None:
            self.writer.close()
        if self.blockmap is not None:
            self.blockmap.close()
            self.blockmap = None
        if self.chunks is not None:
            self.chunks.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def close(self):
        with self.lock:
            if self.closed:
                return
            try:
                if not self.readonly and self.writer.failure is None:
                    self._flush_locked()
                    self._checkpoint_locked()
                    self.writer.trim_padding()
            except OutOfSpaceError:
                pass  # the log is intact; the next open replays its tail
            finally:
                self.closed = True
                self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the log ------------------------------------------------------------------
    def _next_stamp(self):
        sequence = self.next_sequence
        self.next_sequence = sequence + 1
        return self.node_id, sequence, self.clock.now()

    def _append(self, record_type, flags, volume_id, payload, offset_bytes, length_bytes):
        """Append a record stamped by this node; returns (address, hlc)."""
        if self.readonly:
            raise ReadOnlyError("the pool is open read-only")
        node, sequence, hlc = self._next_stamp()
        address = self.writer.append(record_type, flags, volume_id, payload, node, sequence, hlc,
                                     offset_bytes, length_bytes)
        return address, hlc

    def flush(self):
        """A flush point: everything written before is durable once this returns.
        The fdatasync runs outside the pool lock, so other requests go on meanwhile."""
        if self.readonly:
            return  # nothing was written: nothing to make durable
        with self.lock:
            self.writer.drain()
            target = self.writer.position
            chunk = self.writer.chunk
        if chunk is not None:
            self.writer.fdatasync(chunk.fd)  # a chunk switch meanwhile synced it fully anyway
        with self.lock:
            if self.writer.durable_address < target:
                self.writer.durable_address = target
            self._flush_locked(durable=target)
            if (self.blockmap.unsaved >= CHECKPOINT_GROUPS
                    or time.monotonic() - self.last_checkpoint_time >= CHECKPOINT_SECONDS):
                self._checkpoint_locked()
                if (time.monotonic() - self.last_retention_time >= history.RETENTION_INTERVAL
                        and self.role != "mirror"):  # a mirror prunes when its source does
                    self.last_retention_time = time.monotonic()
                    try:
                        history.apply_retention(self)
                    except ChunkvolError as error:  # the flush itself succeeded: say so, retry later
                        self.notes.append(f"retention pass failed: {error}")

    def _flush_locked(self, durable=None, heartbeat=False):
        """A flush point; returns its stamp (the last one's when nothing changed since, unless
        `heartbeat`: peers learn from it that they have all of ours up to now)."""
        if durable is None:
            durable = self.writer.sync()
        if (durable == self.committed_address and not self.blockmap.dirty and not self.blockmap.written
                and not heartbeat):
            return self.committed_stamp  # nothing since the last flush point
        _, stamp = self._append(RecordType.COMMIT, 0, 0, encode_commit(durable, self.origin_stamps), 0, 0)
        # Into the file now (no sync): a kill -9 keeps it, so recovery can still tell damage in
        # the flushed records from a torn tail (it is synced with the next flush anyway).
        self.writer.drain()
        self.committed_address = self.writer.position
        self.committed_stamp = stamp
        self.own_commit_time = time.time()
        self.tombstones.commit(node_index(self.node_id), stamp)
        self.blockmap.seal(stamp, self.node_id)
        return stamp

    def heartbeat(self):
        """With peers, an idle node still makes a flush point now and then (HEARTBEAT_SECONDS):
        it tells them they hold every record of ours up to its stamp, so their snapshots up to
        it are complete and their tombstones before it can go."""
        with self.lock:
            self.peer_nodes = peer_nodes(self.path, self.files)
            if not self.peer_nodes or self.readonly:
                return
            if time.time() - self.own_commit_time >= HEARTBEAT_SECONDS:  # the peer's COMMITs do not count
                self._flush_locked(durable=self.writer.durable_address, heartbeat=True)

    def checkpoint(self):
        """Every version in LMDB, where a lookup by ref (heal.find) looks."""
        with self.lock:
            self._checkpoint_locked()

    def _checkpoint_locked(self):
        """Log durable up to here, then the block map and this address in one synced txn."""
        if self.blockmap.dirty:
            self._flush_locked()
        self.writer.sync()
        self._prune_tombstones()
        self.blockmap.checkpoint(Checkpoint(self.pool_uuid, self.writer.position, self.next_sequence,
                                            self.clock.last, self.next_volume_id, self.records_replayed),
                                 self.origins, self.origin_stamps, self.tombstones, self.removed_volumes)
        self.tombstones.changed = False
        self.last_checkpoint_time = time.monotonic()

    @contextlib.contextmanager
    def request(self):
        """One client request is all or nothing: if appending any of its records fails (a full
        disk), its records leave the log and its changes the block map. Hold the lock."""
        mark = self.writer.mark()
        self.blockmap.undo = undo = []
        try:
            yield
        except BaseException:
            try:
                self.writer.roll_back(mark)
                self.blockmap.roll_back(undo)
            except OSError as error:
                self.writer.fail(error)
            raise
        finally:
            self.blockmap.undo = None

    def maybe_auto_flush(self):
        """Bound memory when a client never flushes: make a flush point of our own. Also
        every AUTO_FLUSH_BYTES written, so a mirror's batch (one flush interval) is bounded."""
        blockmap = self.blockmap
        if len(blockmap.dirty) >= AUTO_FLUSH_GROUPS:
            self._flush_locked()
            self._checkpoint_locked()
        elif sum(blockmap.written.values()) >= AUTO_FLUSH_BYTES:
            # A flush point, not a sync: the COMMIT names what is durable already.
            self._flush_locked(durable=self.writer.durable_address)

    # ---- applying records (live and replay share this) ----------------------------
    def _apply_replayed(self, address, header, payload):
        self._replayed_now += 1
        self._apply_record(address, header, payload)

    def _apply_record(self, address, header, payload, checkpoint=True):
        """One record of the log, replayed or received from another node (mirror/receiver.py)."""
        record_type, flags, volume_id, stored_length, node, sequence, hlc, offset_bytes, length_bytes, _ = header
        if hlc > self.clock.last:
            self.clock.last = hlc
        if node == self.node_id:
            if sequence >= self.next_sequence:
                self.next_sequence = sequence + 1
        elif sequence > self.origins.get(node, 0):
            self.origins[node] = sequence
        if record_type == RecordType.EXTENT:
            if volume_id in self.volumes_by_id:
                ref = (address, stored_length, hlc, flags & FLAG_ZSTD)
                if node == self.node_id:
                    self._map_extent(volume_id, offset_bytes, length_bytes, ref, hlc, node)
                    self.count_written(volume_id, length_bytes)
                else:
                    self._merge_foreign(volume_id, offset_bytes, length_bytes, ref, hlc, node)
        elif record_type == RecordType.ZERO:
            if volume_id in self.volumes_by_id:
                if node == self.node_id:
                    self._map_hole(volume_id, offset_bytes, length_bytes, hlc, node)
                    self.count_written(volume_id, length_bytes)
                elif self._merge_foreign(volume_id, offset_bytes, length_bytes, None, hlc, node):
                    self._add_tombstone(volume_id, offset_bytes, length_bytes, hlc, node)
        elif record_type == RecordType.COMMIT:
            self.tombstones.commit(node_index_of(hlc), hlc)
            if node == self.node_id:
                self.blockmap.seal(hlc, node)
            else:
                seen = commit_seen(payload)
                self.blockmap.seal_foreign(hlc, node, self.tombstones, seen)
                self.peer_seen[node] = seen
                self.origin_stamps[node] = max(hlc, self.origin_stamps.get(node, 0))
            self.committed_stamp = max(self.committed_stamp, hlc)
            if checkpoint and self.index_writable and self.blockmap.unsaved >= CHECKPOINT_GROUPS:
                self._replay_checkpoint(address + HEADER_SIZE + header[3])
        elif record_type in (RecordType.VOLUME_CREATE, RecordType.VOLUME_RESIZE, RecordType.VOLUME_REMOVE,
                             RecordType.VOLUME_PRIMARY):
            if payload is not None:
                self._apply_volume_record(record_type, header[2], bytes(payload), hlc)
        elif record_type in (RecordType.SNAPSHOT, RecordType.ROLLBACK, RecordType.PRUNE):
            if payload is not None and volume_id in self.volumes_by_id:
                history.apply_record(self, record_type, volume_id, bytes(payload), hlc, node)

    def count_written(self, volume_id, length_bytes):
        written = self.blockmap.written
        written[volume_id] = written.get(volume_id, 0) + length_bytes

    def _replay_checkpoint(self, next_address):
        """Bound memory while replaying a long log: checkpoint at a commit record. The log up to
        it is on disk but maybe only in the page cache after a kill -9: sync it first."""
        chunk_id = chunk_header.split_address(next_address)[0]
        for other in self.chunks.ids():
            if other <= chunk_id:
                self.chunks.fdatasync(other)
        self.blockmap.checkpoint(Checkpoint(self.pool_uuid, next_address, self.next_sequence,
                                            self.clock.last, self.next_volume_id,
                                            self.records_replayed + self._replayed_now), self.origins,
                                 self.origin_stamps, self.tombstones, self.removed_volumes)
        self.tombstones.changed = False

    def _merge_foreign(self, volume_id, offset_bytes, length_bytes, ref, hlc, node):
        """Another node's EXTENT (ref) or ZERO (None): each block takes it only if it is newer
        than what the block holds (last writer wins, tombstones giving holes their stamps).
        Its versions wait for that node's COMMIT (BlockMap.seal_foreign)."""
        info = self.volumes_by_id[volume_id]
        if info.mode == "single-primary":
            if info.discarded(node, hlc):
                return False  # an old primary's write its successor never had: left out
            primary = info.primary(at=hlc)
            if primary is not None and primary != node:
                self._note_split_brain(info, node, primary, hlc)
        blockmap = self.blockmap
        first_block = offset_bytes // BLOCK_SIZE
        end_block = first_block + length_bytes // BLOCK_SIZE
        txn = blockmap.reader()
        if ref is None:
            groups = []
            group = first_block // GROUP_BLOCKS
            end_group = (end_block + GROUP_BLOCKS - 1) // GROUP_BLOCKS
            while group < end_group:  # only groups that hold something: a hole over nothing changes nothing
                batch = blockmap.groups_in(txn, volume_id, group, end_group, 4096)
                if not batch:
                    break
                groups.extend(batch)
                group = batch[-1] + 1
        else:
            groups = [first_block // GROUP_BLOCKS]
        for group in groups:
            start = max(first_block, group * GROUP_BLOCKS) - group * GROUP_BLOCKS
            end = min(end_block, (group + 1) * GROUP_BLOCKS) - group * GROUP_BLOCKS
            state = blockmap.get(txn, volume_id, group)
            floors = self.tombstones.floors(volume_id, group)
            merged, before, held = group_map.merge(state, start, end - start, ref, hlc, floors)
            if ref is None:  # a hole meeting a hole is no conflict: either way it reads zeros
                before = [0 if other > data else other for other, data in zip(before, held)]
            blockmap.update_foreign(volume_id, group, merged if merged is not state else None,
                                    start, end - start, ref, hlc, before)
        blockmap.foreign_written[volume_id] = blockmap.foreign_written.get(volume_id, 0) + length_bytes
        return True

    def _prune_tombstones(self):
        """Tombstones matter while a peer may still send a record older than them, or one
        written without having seen them (a conflict to report). They go up to the stamp to
        which every peer P has sent us its records and seen every other node's tombstones
        (the seen stamps of P's last COMMIT here)."""
        if not self.tombstones.by_volume:
            return
        peers = set(self.peer_nodes) | set(self.origins)
        sent = min((self.origin_stamps.get(peer, 0) for peer in peers), default=self.clock.last)
        horizon = sent
        for origin in self.tombstones.origins():
            for peer in peers:
                if peer != origin:
                    horizon = min(horizon, self.peer_seen.get(peer, {}).get(origin, 0))
        # One horizon for all origins: a block's newest tombstone goes only with every older
        # one, so what is left still names the block's newest ZERO (or none at all).
        self.tombstones.prune(horizon)

    def _map_extent(self, volume_id, offset_bytes, length_bytes, ref, hlc, node):
        """Blocks [offset, offset+length) of one group now live in record `ref`."""
        group, first = divmod(offset_bytes // BLOCK_SIZE, GROUP_BLOCKS)
        count = length_bytes // BLOCK_SIZE
        blockmap = self.blockmap
        state = None
        if count != GROUP_BLOCKS:
            state = blockmap.overlay.get((volume_id, group))
            if state is None:
                txn = blockmap.reader()
                state = blockmap.stored_state(txn, volume_id, group)
        blockmap.update(volume_id, group, group_map.apply_write(state, first, count, ref), hlc, node)

    def _add_tombstone(self, volume_id, offset_bytes, length_bytes, hlc, node):
        if self.peer_nodes or self.origins:  # only another writer's older record could need it
            self.tombstones.add(volume_id, offset_bytes // BLOCK_SIZE, (offset_bytes + length_bytes) // BLOCK_SIZE,
                                hlc, node)

    def _map_hole(self, volume_id, offset_bytes, length_bytes, hlc, node):
        """Blocks [offset, offset+length) read as zeros from now on (any number of groups)."""
        self._add_tombstone(volume_id, offset_bytes, length_bytes, hlc, node)
        first_block = offset_bytes // BLOCK_SIZE
        end_block = first_block + length_bytes // BLOCK_SIZE
        blockmap = self.blockmap
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

    # ---- volumes ------------------------------------------------------------------
    def _add_volume(self, info, persist=True):
        self.volumes[info.name] = info
        self.volumes_by_id[info.volume_id] = info
        if info.parent:
            self.blockmap.parents[info.volume_id] = (info.parent["id"], info.parent["stamp"])
        mine = node_index(self.node_id) << VOLUME_ID_NODE_SHIFT
        if info.volume_id >> VOLUME_ID_NODE_SHIFT == mine >> VOLUME_ID_NODE_SHIFT and info.volume_id >= self.next_volume_id:
            self.next_volume_id = info.volume_id + 1
        if persist:
            self.blockmap.put_volume(info.name, info.as_dict())

    def _apply_volume_record(self, record_type, volume_id, payload, hlc):
        try:
            description = json.loads(payload)
        except ValueError:
            self.damage.append(CorruptionError(f"volume record for id {volume_id} is not JSON"))
            return
        if record_type == RecordType.VOLUME_CREATE:
            if volume_id in self.volumes_by_id or volume_id in self.removed_volumes:
                return  # the same record again (a mirror's resend is skipped before; replay after a rebuild),
                # or removed by another node before its creation reached this one
            primary = description.get("primary")
            info = VolumeInfo(volume_id, description["name"], description["size"], description["compression"], hlc,
                              description.get("parent"), mode=description.get("mode"),
                              primaries=[(hlc, primary)] if primary is not None else ())
            self._settle_name(info)
            self._add_volume(info)
        else:
            info = self.volumes_by_id.get(volume_id)
            if record_type == RecordType.VOLUME_REMOVE:
                # A remove wins, wherever it arrives in the order: writes made elsewhere while
                # apart go with the volume (docs/MULTIMASTER.md).
                self.removed_volumes[volume_id] = max(hlc, self.removed_volumes.get(volume_id, 0))
            if info is None:
                return
            if record_type == RecordType.VOLUME_PRIMARY:
                seen = {int(node): stamp for node, stamp in description.get("seen", {}).items()}
                self._apply_primary(info, description["primary"], hlc, seen)
            elif record_type == RecordType.VOLUME_RESIZE:
                # The greatest size wins, whatever the order (sizes made apart: a volume never shrinks).
                if description["size"] > info.size_bytes:
                    info.size_bytes = description["size"]
                    self.blockmap.put_volume(info.name, info.as_dict())
            else:
                del self.volumes[info.name]
                del self.volumes_by_id[volume_id]
                self.snapshots.pop(volume_id, None)
                self.blockmap.forget_volume(volume_id)
                self.tombstones.forget_volume(volume_id)
                self.blockmap.put_volume(info.name, None)

    def _settle_name(self, info):
        """Two nodes created volumes of one name while apart: the older keeps it, the newer is
        renamed NAME.nodeN (N: its creator's index). The same on every node, whatever the order."""
        other = self.volumes.get(info.name)
        if other is None or other.volume_id == info.volume_id:
            return
        newer = info if (info.created_hlc, info.volume_id) > (other.created_hlc, other.volume_id) else other
        name = f"{newer.name}.node{node_index_of(newer.created_hlc)}"
        while name in self.volumes:
            name += "+"
        if newer is other:
            del self.volumes[other.name]
            self.blockmap.put_volume(other.name, None)
            other.name = name
            self.volumes[name] = other
            self.blockmap.put_volume(name, other.as_dict())
        else:
            info.name = name
        self.notes.append(f"volume name {info.name if newer is other else other.name!r} was created on two nodes: "
                          f"the newer one is now {name!r}")

    def _apply_primary(self, info, node, hlc, seen):
        """A VOLUME_PRIMARY record: `node` writes the single-primary volume from `hlc` on.
        Writes of the other nodes it had not received then (`seen`: the stamp of each one's
        last COMMIT it had) and made before `hlc` are left out of the volume everywhere: the
        new primary's filesystem moved on without them (DRBD discards them too); they stay in
        their node's log and history. If this node wrote it after that stamp (both were
        primary while apart), that is split brain: recorded, and resolved like any concurrent
        writes (last writer wins)."""
        if (hlc, node) in info.primaries:
            return
        info.primaries = sorted(info.primaries + [(hlc, node)])
        for other in set(self.origins) | set(self.peer_nodes) | {self.node_id}:
            if other != node and seen.get(other, 0) < hlc:
                event = {"node": other, "after": seen.get(other, 0), "before": hlc}
                if event not in info.discards:
                    info.discards.append(event)
                    self._leave_out(info, other, event["after"], hlc)
        if node != self.node_id:
            mine = [stamp for stamp, _, writer in self.blockmap.history(info.volume_id, after=hlc)
                    if writer == self.node_id]
            if mine:
                self._note_split_brain(info, self.node_id, node, min(mine))
        self.blockmap.put_volume(info.name, info.as_dict())

    def _leave_out(self, info, node, after, before):
        """Take `node`'s writes stamped in (after, before) back out of the volume's live state
        here; versions keep them (history still shows what was). In a single-primary volume
        nobody else wrote it in that window (its next primary writes from `before` on), so a
        block such a write holds gets back what it held at `after`."""
        index = node_index(node)

        def left_out(stamp):
            return node_index_of(stamp) == index and after < stamp < before

        volume_id = info.volume_id
        blockmap = self.blockmap
        txn = blockmap.reader()
        groups = sorted({group for group, stamp, _ in blockmap.versions_of(volume_id) if stamp > after}
                        | {group for volume, group in blockmap.overlay if volume == volume_id})
        zeroes = {}  # group -> per block, the greatest left-out ZERO's stamp
        for group in groups:
            zeroes[group] = [0] * GROUP_BLOCKS
        for first, end, stamp, _, origin in self.tombstones.by_volume.get(volume_id, ()):
            if origin == node and left_out(stamp):
                for block in range(first, end):
                    row = zeroes.get(block // GROUP_BLOCKS)
                    if row is not None and stamp > row[block % GROUP_BLOCKS]:
                        row[block % GROUP_BLOCKS] = stamp
        floors_all = {group: self.tombstones.floors(volume_id, group) or [0] * GROUP_BLOCKS for group in groups}
        self.tombstones.drop(volume_id, lambda entry: entry[4] == node and left_out(entry[2]))
        for group in groups:
            live = blockmap.get(txn, volume_id, group)
            if live is None:
                continue
            earlier = group_map.to_blocks(blockmap.stored_state(txn, volume_id, group, after))
            blocks = group_map.to_blocks(live)
            changed = False
            for block, entry in enumerate(blocks):
                if entry is not None:
                    held_by_left_out = left_out(entry[0][2])
                else:
                    held_by_left_out = zeroes[group][block] and zeroes[group][block] == floors_all[group][block]
                if held_by_left_out:
                    blocks[block] = earlier[block]
                    changed = True
            if changed:
                blockmap.update(volume_id, group, group_map.from_blocks(blocks), before, node)

    def _note_split_brain(self, info, writer, primary, stamp):
        for event in info.split_brain:
            if event["writer"] == writer and event["primary"] == primary:
                event["first"] = min(event["first"], stamp)
                event["last"] = max(event["last"], stamp)
                break
        else:
            info.split_brain.append({"writer": writer, "primary": primary, "first": stamp, "last": stamp})
            self.notes.append(f"split brain on volume {info.name!r}: node {writer} wrote while node {primary} "
                              "was primary; resolved by last writer wins (`chunkvol conflicts`)")
        self.blockmap.put_volume(info.name, info.as_dict())

    def writable_here(self, info):
        """A single-primary volume takes writes only on its primary node."""
        return info.mode != "single-primary" or info.primary() in (None, self.node_id)

    def _volume_change(self, record_type, volume_id, description):
        payload = json.dumps(description, sort_keys=True).encode()
        address, hlc = self._append(record_type, 0, volume_id, payload, 0, 0)
        self._apply_volume_record(record_type, volume_id, payload, hlc)
        self._flush_locked()
        self._checkpoint_locked()

    def create_volume(self, name, size_bytes, compression="none", parent=None, mode=None):
        """`mode`: for a pool with peers, "single-primary" (the default there: this node
        writes, the others serve it read-only until `volume promote`) or "multi-master"."""
        validate_volume_name(name)
        size_bytes = _check_volume_size(size_bytes)
        if compression not in COMPRESSIONS:
            raise UsageError(f"unknown compression {compression!r} (use one of: {', '.join(COMPRESSIONS)})")
        if mode not in (None,) + VOLUME_MODES:
            raise UsageError(f"unknown mode {mode!r} (use one of: {', '.join(VOLUME_MODES)})")
        with self.lock:
            if name in self.volumes:
                raise AlreadyExistsError(f"volume {name!r} already exists")
            description = {"name": name, "size": size_bytes, "compression": compression}
            if parent is not None:
                description["parent"] = parent
            if mode is None:
                self.peer_nodes = peer_nodes(self.path, self.files)  # a `peer add` may be a moment old
                if self.peer_nodes:
                    mode = "single-primary"
            if mode is not None:
                description["mode"] = mode
                if mode == "single-primary":
                    description["primary"] = self.node_id
            self._volume_change(RecordType.VOLUME_CREATE, self.next_volume_id, description)
            return self.volumes[name]

    def promote_volume(self, name):
        """This node becomes the writer of a single-primary volume (the one that was is lost,
        or hands over). Its clients must reconnect to write."""
        with self.lock:
            info = self.volume_info(name)
            if info.mode != "single-primary":
                raise UsageError(f"volume {name!r} is not single-primary (every node writes it already)")
            if info.primary() == self.node_id:
                raise UsageError(f"this node (node {self.node_id}) is already the primary of {name!r}")
            self._volume_change(RecordType.VOLUME_PRIMARY, info.volume_id,
                                {"name": name, "primary": self.node_id,
                                 "seen": {str(node): stamp for node, stamp in self.origin_stamps.items()}})
            return info

    def resize_volume(self, name, size_bytes):
        size_bytes = _check_volume_size(size_bytes)
        with self.lock:
            info = self.volume_info(name)
            if size_bytes < info.size_bytes:
                raise OutOfRangeError(f"volume {name!r} is {info.size_bytes} bytes; shrinking is not supported")
            if size_bytes != info.size_bytes:
                self._volume_change(RecordType.VOLUME_RESIZE, info.volume_id, {"name": name, "size": size_bytes})
            return info

    def attach(self, name, live=True, point=None):
        """An NBD connection opened the volume (live=False: one of its past points). A `point`
        it reads (history.Point) is held while it is open, as a snapshot is: prune keeps it."""
        with self.lock:
            count, live_count = self.users.get(name, (0, 0))
            self.users[name] = (count + 1, live_count + (1 if live else 0))
            if point is not None:
                held = self.points_read.setdefault(point.info.volume_id, {})
                held[point.stamp] = held.get(point.stamp, 0) + 1

    def detach(self, name, live=True, point=None):
        with self.lock:
            count, live_count = self.users.get(name, (0, 0))
            self.users[name] = (max(0, count - 1), max(0, live_count - (1 if live else 0)))
            held = self.points_read.get(point.info.volume_id, {}) if point is not None else {}
            if point is not None and point.stamp in held:
                held[point.stamp] -= 1
                if not held[point.stamp]:
                    del held[point.stamp]

    def points_being_read(self, volume_id):
        """Stamps of the volume's past points that open connections read now."""
        with self.lock:
            return sorted(self.points_read.get(volume_id, ()))

    def connections(self, name, live_only=False):
        return self.users.get(name, (0, 0))[1 if live_only else 0]

    def remove_volume(self, name, with_snapshots=False):
        with self.lock:
            info = self.volume_info(name)
            if self.connections(name):
                raise PoolBusyError(f"volume {name!r} is in use by {self.connections(name)} NBD connection(s); "
                                    "disconnect them first")
            clones = sorted(other.name for other in self.volumes.values()
                            if other.parent and other.parent["id"] == info.volume_id)
            if clones:
                raise UsageError(f"volume {name!r} has clones ({', '.join(clones)}); remove them first")
            snapshots = self.snapshots.get(info.volume_id)
            if snapshots and not with_snapshots:
                raise UsageError(f"volume {name!r} has {len(snapshots)} snapshots; remove them first, "
                                 "or remove the volume with its snapshots (--with-snapshots)")
            self._volume_change(RecordType.VOLUME_REMOVE, info.volume_id, {"name": name})

    def volume_info(self, name):
        try:
            return self.volumes[name]
        except KeyError:
            raise NotFoundError(f"no volume named {name!r} in pool {self.path}") from None

    def volume(self, name, readonly=False):
        """A volume by name; `VOL@SNAPSHOT` or `VOL@<UTC time>` is a read-only view of a past point."""
        from chunkvol.volume import Volume
        if "@" in name:
            with self.lock:
                point = history.resolve_point(self, name)
            return Volume(self, point.info, readonly=True, point=point)
        info = self.volume_info(name)
        return Volume(self, info, readonly=readonly or self.readonly or self.role == "mirror"
                      or not self.writable_here(info))

    def become_writer(self):
        """A mirror becomes a writing node of the pool (a peer of the others): pool.json loses
        its mirror role. Returns the node id."""
        with self.lock:
            if self.role == "mirror":
                fields = {key: value for key, value in self.fields.items()
                          if key not in ("role", "mirror_of", "checksum")}
                self.files.publish(os.path.join(self.path, "pool.json"), pool_metadata.encode(fields))
                self.fields, self.role = fields, "primary"
            return self.node_id

    def check_changeable(self):
        """A mirror takes changes only from its source (records it receives)."""
        if self.role == "mirror":
            raise ReadOnlyError(f"this pool is a mirror of node {self.fields.get('mirror_of')}: it changes only "
                                "through what its source ships (`chunkvol mirror promote` makes it writable)")


def take_pool_lock(path):
    """Hold POOL/lock for this process (locks.py)."""
    return locks.hold(os.path.join(path, "lock"), f"pool {path} is in use by another process (pid {{pid}}); "
                      "stop it, or use a read-only command")


def _check_volume_size(size_bytes):
    if not isinstance(size_bytes, int) or size_bytes <= 0:
        raise UsageError("volume size must be a positive number of bytes")
    if size_bytes % BLOCK_SIZE:
        raise UsageError("volume size must be a multiple of 4096 bytes")
    if size_bytes > MAX_VOLUME_BYTES:
        raise UsageError("volume size is over the 1 PiB limit")
    return size_bytes
