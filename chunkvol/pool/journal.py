"""The journal: how the pool's changes reach its log and become durable.

It owns the sequence and the clock: every record this node writes takes the next origin
sequence and a stamp (`next_stamp`). A flush point is a COMMIT record naming the log address
up to which the log was synced; a checkpoint saves the block map with the log address it
reflects, in one synced LMDB transaction, so an open replays only the log after it. The pool
makes flush points of its own: to bound memory (AUTO_FLUSH_GROUPS), a mirror's batch
(AUTO_FLUSH_BYTES) and, with peers, as heartbeats; and checkpoints every CHECKPOINT_GROUPS
unsaved versions or CHECKPOINT_SECONDS. A client request's records are all or nothing
(`request`).

Its state is the pool's (`next_sequence`, `clock`, `committed_address`, `committed_stamp`,
`own_commit_time`, `last_checkpoint_time`, `last_retention_time`); the functions take the
pool first and are bound as its methods (pool.flush_point()). Every function takes the pool
lock (reentrant) itself, but `append` and `request`: hold it around those.
"""

import time

from chunkvol import history
from chunkvol.errors import ChunkvolError, ReadOnlyError
from chunkvol.clock import node_index
from chunkvol.format import chunk_header
from chunkvol.format.checkpoint import Checkpoint
from chunkvol.format.record import RecordType, encode_commit
from chunkvol.mirror.config import peer_nodes
from chunkvol.pool import merge

HEARTBEAT_SECONDS = 1.0
CHECKPOINT_GROUPS = 16384      # unsaved group versions that force a checkpoint (memory bound)
AUTO_FLUSH_GROUPS = 16384      # unsealed groups that force a flush point (1 GiB of data)
AUTO_FLUSH_BYTES = 16 << 20    # bytes written since the last flush point that force one (a mirror's
                               # batch is whole flush intervals: with a 32 MiB request it stays < 64 MiB)
CHECKPOINT_SECONDS = 30.0


def next_stamp(pool):
    """(node, sequence, stamp) for this node's next record (the log writer's stamp source)."""
    sequence = pool.next_sequence
    pool.next_sequence = sequence + 1
    return pool.node_id, sequence, pool.clock.now()


def append(pool, record_type, flags, volume_id, payload, offset_bytes, length_bytes):
    """Append a record stamped by this node; returns (address, hlc). Hold the pool lock."""
    if pool.readonly:
        raise ReadOnlyError("the pool is open read-only")
    node, sequence, hlc = next_stamp(pool)
    address = pool.writer.append(record_type, flags, volume_id, payload, node, sequence, hlc,
                                 offset_bytes, length_bytes)
    return address, hlc


def flush(pool):
    """A flush point: everything written before is durable once this returns.
    The fdatasync runs outside the pool lock, so other requests go on meanwhile."""
    if pool.readonly:
        return  # nothing was written: nothing to make durable
    writer = pool.writer
    with pool.lock:
        writer.drain()
        target = writer.position
        chunk = writer.chunk
    if chunk is not None:
        writer.fdatasync(chunk.fd)  # a chunk switch meanwhile synced it fully anyway
    with pool.lock:
        if writer.durable_address < target:
            writer.durable_address = target
        flush_point(pool, durable=target)
        if (pool.blockmap.unsaved >= CHECKPOINT_GROUPS
                or time.monotonic() - pool.last_checkpoint_time >= CHECKPOINT_SECONDS):
            checkpoint(pool)
            if (time.monotonic() - pool.last_retention_time >= history.RETENTION_INTERVAL
                    and pool.role != "mirror"):  # a mirror prunes when its source does
                pool.last_retention_time = time.monotonic()
                try:
                    history.apply_retention(pool)
                except ChunkvolError as error:  # the flush itself succeeded: say so, retry later
                    pool.notes.append(f"retention pass failed: {error}")


def flush_point(pool, durable=None, heartbeat=False):
    """A flush point now, the log synced first unless `durable` (an address already synced)
    is given; returns its stamp (the last one's when nothing changed since, unless
    `heartbeat`: peers learn from it that they have all of ours up to now)."""
    with pool.lock:
        writer = pool.writer
        blockmap = pool.blockmap
        if durable is None:
            durable = writer.sync()
        if (durable == pool.committed_address and not blockmap.dirty and not blockmap.written
                and not heartbeat):
            return pool.committed_stamp  # nothing since the last flush point
        _, stamp = append(pool, RecordType.COMMIT, 0, 0, encode_commit(durable, pool.origin_stamps), 0, 0)
        # Into the file now (no sync): a kill -9 keeps it, so recovery can still tell damage in
        # the flushed records from a torn tail (it is synced with the next flush anyway).
        writer.drain()
        pool.committed_address = writer.position
        pool.committed_stamp = stamp
        pool.own_commit_time = time.time()
        pool.tombstones.commit(node_index(pool.node_id), stamp)
        blockmap.seal(stamp, pool.node_id)
        return stamp


def heartbeat(pool):
    """With peers, an idle node still makes a flush point now and then (HEARTBEAT_SECONDS):
    it tells them they hold every record of ours up to its stamp, so their snapshots up to
    it are complete and their tombstones before it can go."""
    with pool.lock:
        pool.peer_nodes = peer_nodes(pool.path, pool.files)
        if not pool.peer_nodes or pool.readonly:
            return
        if time.time() - pool.own_commit_time >= HEARTBEAT_SECONDS:  # the peer's COMMITs do not count
            flush_point(pool, durable=pool.writer.durable_address, heartbeat=True)


def checkpoint(pool):
    """Log durable up to here, then the block map and this address in one synced LMDB
    transaction: every version is in LMDB after it."""
    with pool.lock:
        if pool.blockmap.dirty:
            flush_point(pool)
        pool.writer.sync()
        merge.prune_tombstones(pool)
        _save_map(pool, pool.writer.position, pool.records_replayed)
        pool.last_checkpoint_time = time.monotonic()


def checkpoint_if_due(pool):
    """A checkpoint when CHECKPOINT_GROUPS versions are unsaved (the memory bound)."""
    with pool.lock:
        if pool.blockmap.unsaved >= CHECKPOINT_GROUPS:
            checkpoint(pool)


def replay_checkpoint_if_due(pool, next_address):
    """While replaying a long log, bound memory: at a COMMIT record, checkpoint at the log
    address after it when CHECKPOINT_GROUPS versions are unsaved. The log up to it is on disk
    but maybe only in the page cache after a kill -9: sync it first."""
    if not pool.index_writable or pool.blockmap.unsaved < CHECKPOINT_GROUPS:
        return
    chunk_id = chunk_header.split_address(next_address)[0]
    for other in pool.chunks.ids():
        if other <= chunk_id:
            pool.chunks.fdatasync(other)
    _save_map(pool, next_address, pool.records_replayed + pool.replayed_at_open)


def _save_map(pool, log_address, records_replayed):
    pool.blockmap.checkpoint(Checkpoint(pool.pool_uuid, log_address, pool.next_sequence, pool.clock.last,
                                        pool.next_volume_id, records_replayed),
                             pool.origins, pool.origin_stamps, pool.tombstones, pool.removed_volumes)
    pool.tombstones.changed = False


class Request:
    """One client request is all or nothing: if appending any of its records fails (a full
    disk), its records leave the log and its changes the block map. Hold the pool lock.
    (A class, not a generator: entered on every write, it costs half as much.)"""

    __slots__ = ("pool", "mark", "undo")

    def __init__(self, pool):
        self.pool = pool

    def __enter__(self):
        pool = self.pool
        self.mark = pool.writer.mark()
        pool.blockmap.undo = self.undo = []

    def __exit__(self, kind, error, trace):
        pool = self.pool
        try:
            if kind is not None:
                try:
                    pool.writer.roll_back(self.mark)
                    pool.blockmap.roll_back(self.undo)
                except OSError as failure:
                    pool.writer.fail(failure)  # raises DeviceFailedError in place of the request's error
        finally:
            pool.blockmap.undo = None
        return False


def request(pool):
    """`with pool.request():` around the appends of one client request (see Request)."""
    return Request(pool)


def auto_flush(pool):
    """Bound memory when a client never flushes: make a flush point of our own. Also
    every AUTO_FLUSH_BYTES written, so a mirror's batch (one flush interval) is bounded.
    Hold the pool lock."""
    blockmap = pool.blockmap
    if len(blockmap.dirty) >= AUTO_FLUSH_GROUPS:
        flush_point(pool)
        checkpoint(pool)
    elif sum(blockmap.written.values()) >= AUTO_FLUSH_BYTES:
        # A flush point, not a sync: the COMMIT names what is durable already.
        flush_point(pool, durable=pool.writer.durable_address)
        # Its sealed versions wait in memory for a checkpoint; with a client that never
        # flushes, only this keeps them bounded (dirty groups never reach AUTO_FLUSH_GROUPS
        # when every 16 MiB seals them).
        checkpoint_if_due(pool)
