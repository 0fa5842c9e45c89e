"""Pool: one node's storage: `pool.json`, chunk files, the block map, and the open log.

Layout of a pool directory:

    pool.json        pool metadata (format/pool_metadata.py)
    lock             held (flock) by the one process that has the pool open for writing
    chunks/          chunk files (format/chunk_header.py, format/record.py); more
                     directories, on other disks, may be listed in pool.json
    index/           LMDB block map and volume table: a cache, rebuilt from the log if lost

Every change is a record appended to the log first; the in-memory state (volumes, block map
overlay) is then changed by the same code that replays the log at open (apply.py), so what a
pool shows after a crash is what the log says. One lock serialises the pool's state; nbdkit's
threads take it per request.

`Pool` holds the state and opens, creates and closes a pool; its parts hold the code, each
one job, as functions of the pool:

    metadata.py     pool.json and the pool lock
    journal.py      appending, flush points, checkpoints, auto flush, heartbeats (the
                    sequence and the clock)
    apply.py        applying a record: replay, the receiver, and what was just written
    merge.py        other nodes' writes: last writer wins, tombstones, primaries, split brain
    volumes.py      the volume table: VolumeInfo, name and size rules, volume commands
    connections.py  the NBD connections open to each volume and the points they read

The entry points other modules use are bound as Pool methods (pool.flush_point()).
"""

import functools
import os
import threading
import time

import zstandard

from chunkvol.clock import HybridClock, node_index
from chunkvol.errors import CorruptionError, NotFoundError, OutOfSpaceError, ReadOnlyError
from chunkvol.format import chunk_header
from chunkvol.index.blockmap import BlockMap
from chunkvol.index.tombstones import Tombstones
from chunkvol.log import base
from chunkvol.log.recovery import recover
from chunkvol.log.writer import LogWriter
from chunkvol.mirror.config import peer_nodes
from chunkvol.pool import apply, journal, merge, metadata, volumes
from chunkvol.pool.connections import Connections
from chunkvol.pool.metadata import CACHE_MODES, DEFAULT_CHUNK_SIZE, take_pool_lock
from chunkvol.pool.volumes import (COMPRESSIONS, MAX_VOLUME_BYTES, VOLUME_ID_NODE_SHIFT, VOLUME_MODES, VolumeInfo,
                                   check_volume_size, validate_volume_name)
from chunkvol.storage.chunks import ChunkTable
from chunkvol.storage.files import LocalFiles
from chunkvol.volume import open_volume

__all__ = ["Pool", "VolumeInfo", "take_pool_lock", "validate_volume_name", "check_volume_size", "CACHE_MODES",
           "DEFAULT_CHUNK_SIZE", "COMPRESSIONS", "MAX_VOLUME_BYTES", "VOLUME_ID_NODE_SHIFT", "VOLUME_MODES"]


class Pool:
    """An opened pool. Use `Pool.create` then `Pool.open`; close it (or use `with`).

    It holds the pool's state, grouped below by the part that changes it; the entry points of
    the parts that other modules use are its methods."""

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
        self.connections = Connections(self.lock)
        # The journal's state (journal.py):
        self.clock = HybridClock(index=node_index(self.node_id))
        self.next_sequence = 1
        self.committed_address = None  # log position just after our last COMMIT record
        self.committed_stamp = 0  # stamp of the last flush point
        self.own_commit_time = 0.0  # wall time of this node's last COMMIT (heartbeats count from it)
        self.last_checkpoint_time = self.last_retention_time = time.monotonic()
        # The volume table (volumes.py):
        self.volumes = {}
        self.volumes_by_id = {}
        self.snapshots = {}  # volume_id -> {name: {"name", "stamp", "size", "created"}}
        self.next_volume_id = volumes.first_volume_id(self.node_id)
        # volume id -> stamp of its VOLUME_REMOVE: another node's records of it that arrive
        # later (written while apart) are taken and dropped, not refused as forged
        self.removed_volumes = {}
        # What other nodes sent (merge.py, apply.py):
        self.origins = {}  # other node -> greatest origin sequence of its records in our log
        self.origin_stamps = {}  # other node -> stamp of its last COMMIT in our log
        self.tombstones = Tombstones()  # stamped holes, while a peer's older record may still come
        self.peer_nodes = frozenset()  # node ids of this pool's peers (multi-master), from mirrors.json
        self.peer_seen = {}  # peer -> {node: stamp} it had seen at its last COMMIT that reached us
        # This open:
        self.records_replayed = 0  # by every open of the map since it was built
        self.replayed_at_open = 0  # by this open
        self.damage = []
        self.recovery = None
        self.notes = []  # things a user should know about this open (status shows them)
        self.compressor = zstandard.ZstdCompressor(level=1, write_content_size=True)
        self.decompressor = zstandard.ZstdDecompressor()
        self.lock_fd = None
        self.chunks = None
        self.blockmap = None
        self.writer = None
        self.closed = False

    # ---- the parts' entry points (functions of the pool, bound: no extra call per request)
    append = journal.append
    flush = journal.flush
    flush_point = journal.flush_point
    checkpoint = journal.checkpoint
    checkpoint_if_due = journal.checkpoint_if_due
    heartbeat = journal.heartbeat
    request = journal.request
    maybe_auto_flush = journal.auto_flush
    apply_record = apply.apply_record
    map_hole = apply.map_hole
    count_written = apply.count_written
    writable_here = merge.writable_here
    volume_info = volumes.volume_info
    create_volume = volumes.create_volume
    promote_volume = volumes.promote_volume
    resize_volume = volumes.resize_volume
    remove_volume = volumes.remove_volume
    create = staticmethod(metadata.create)
    read_metadata = staticmethod(metadata.read)

    # ---- opening and closing ------------------------------------------------------
    @classmethod
    def open(cls, path, readonly=False, files=None, index_path=None, cache=None, wall=None):
        """Open a pool. `readonly`: no lock, nothing written to the log (a server may be
        running). `index_path`: build the block map there instead of POOL/index. `cache`:
        "writeback" (log writes go through the page cache) or "none" (O_DIRECT, as qemu's
        cache=none); None takes the pool's setting (pool.json "cache", default writeback).
        `wall`: the wall clock in ns (a simulation's; default time.time_ns)."""
        files = files or LocalFiles()
        path = os.path.abspath(path)
        if cache is not None:
            metadata.check_cache(cache)
        pool = cls(path, metadata.read(path, files), files, readonly, index_path, cache)
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
            self.lock_fd = take_pool_lock(self.path)
        self.chunks = ChunkTable(self.files, self.pool_uuid, self.chunk_dirs, self.chunk_size,
                                 writable=not self.readonly).load()
        index_path = self.index_path
        if not self.index_writable and not os.path.exists(os.path.join(index_path, "data.mdb")):
            raise NotFoundError("the pool has no block map yet; open it read-write once to build it")
        checkpoint = self._open_blockmap(index_path)
        if checkpoint is None and self.chunks.ids():
            # A rebuild. Chunks that compaction freed are summarized by a base in the log.
            checkpoint = base.load_base(self.chunks, self.path, self.pool_uuid, self.blockmap)
            if checkpoint is None and self.chunks.ids()[0] != 1:
                raise CorruptionError(f"the log starts at chunk {self.chunks.ids()[0]} (earlier ones were compacted "
                                      "away) and no complete base summary of them is readable", self.path)
        if checkpoint is None:
            first = self.chunks.ids()[0] if self.chunks.ids() else 1
            start = chunk_header.address(first, chunk_header.DATA_OFFSET)
        else:
            start = checkpoint.log_address
            self._resume(checkpoint)
        self.peer_nodes = peer_nodes(self.path, self.files)
        for info in self.blockmap.stored_volumes():
            volumes.add_volume(self, VolumeInfo.from_dict(info), persist=False)
        for volume_id, snapshot in self.blockmap.stored_snapshots():
            self.snapshots.setdefault(volume_id, {})[snapshot["name"]] = snapshot
        result = recover(self.chunks, start, functools.partial(apply.apply_replayed, self), writable=not self.readonly,
                         volume_sizes=lambda: {v.volume_id: v.size_bytes for v in self.volumes.values()},
                         local_node=self.node_id)
        self.damage = result.damage
        self.recovery = result
        self.records_replayed += self.replayed_at_open
        stamp_source = functools.partial(journal.next_stamp, self)  # for the SEAL records the writer makes
        self.writer = LogWriter(self.chunks, self.files, result.end_address, stamp_source,
                                direct=not self.readonly and self.cache == "none")
        self.committed_stamp = max(self.committed_stamp, self.clock.last)  # every version is at or before it
        if not (result.records_applied or result.requests_discarded or checkpoint is None):
            self.committed_address = result.end_address  # the checkpoint is the log's end: nothing to seal
        if not self.readonly and (result.records_applied or result.requests_discarded or checkpoint is None):
            try:
                journal.flush_point(self)
                journal.checkpoint(self)
            except OutOfSpaceError as error:
                # The replayed state is in memory and the log is intact: serve and read on;
                # writes fail with ENOSPC until space returns, and the next open replays again.
                self.notes.append(f"not checkpointed at open: {error}")

    def _resume(self, checkpoint):
        """The state the checkpoint saved beside the map."""
        self.next_sequence = checkpoint.next_origin_sequence
        self.clock.observe(checkpoint.max_hlc)
        if volumes.created_here(checkpoint.next_volume_id, self.node_id):
            self.next_volume_id = checkpoint.next_volume_id  # else: ids of an older pool; ours come from our space
        self.records_replayed = checkpoint.records_replayed
        self.origins = self.blockmap.read_origins()
        self.origin_stamps = self.blockmap.read_origin_stamps()
        self.tombstones = Tombstones(self.blockmap.read_tombstones())
        self.removed_volumes = self.blockmap.read_removed_volumes()

    def _open_blockmap(self, index_path):
        """Open the block map and read its checkpoint. It is a cache: when it is damaged (not
        LMDB, cut short, a checkpoint that fails its checksum or names another pool) a writable
        open sets it aside as index.damaged-<time> and rebuilds it from the log."""
        try:
            self.blockmap, checkpoint = BlockMap.open_checked(index_path, readonly=not self.index_writable)
            if checkpoint is not None and checkpoint.pool_uuid != self.pool_uuid:
                raise CorruptionError("the block map belongs to another pool", index_path)
            return checkpoint
        except CorruptionError as error:
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
                    journal.flush_point(self)
                    journal.checkpoint(self)
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

    # ---- volumes and roles ----------------------------------------------------------
    def volume(self, name, readonly=False, heal=None):
        """A volume by name, or a read-only view of a past point (volume.open_volume)."""
        return open_volume(self, name, readonly=readonly, heal=heal)

    def become_writer(self):
        """A mirror becomes a writing node of the pool (a peer of the others): pool.json loses
        its mirror role. Returns the node id."""
        with self.lock:
            if self.role == "mirror":
                self.fields = metadata.drop_mirror_role(self.path, self.fields, self.files)
                self.role = "primary"
            return self.node_id

    def check_changeable(self):
        """A mirror takes changes only from its source (records it receives)."""
        if self.role == "mirror":
            raise ReadOnlyError(f"this pool is a mirror of node {self.fields.get('mirror_of')}: it changes only "
                                "through what its source ships (`chunkvol mirror promote` makes it writable)")
