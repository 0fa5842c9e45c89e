"""The pool's volume table: VolumeInfo, the rules for names and sizes, the records that
change the table (VOLUME_CREATE, VOLUME_RESIZE, VOLUME_REMOVE, VOLUME_PRIMARY) and the
commands that write them.

A command appends its record, applies it with the code that replays it, then makes a flush
point and a checkpoint, so a volume change is durable when the command returns. The table is
pool state (`pool.volumes` by name, `pool.volumes_by_id`, `pool.removed_volumes`), changed
only here and by merge.py's renames."""

import json
import re

from chunkvol.clock import node_index
from chunkvol.errors import (AlreadyExistsError, CorruptionError, NotFoundError, OutOfRangeError, PoolBusyError,
                             UsageError)
from chunkvol.format.record import BLOCK_SIZE, RecordType
from chunkvol.mirror.config import peer_nodes
from chunkvol.pool import journal, merge

VOLUME_MODES = ("single-primary", "multi-master")
VOLUME_ID_NODE_SHIFT = 24  # a volume id's top bits are the creating node's index: no two nodes pick one id
VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
COMPRESSIONS = ("none", "zstd")
MAX_VOLUME_BYTES = 1 << 50


def validate_volume_name(name):
    if not isinstance(name, str) or not VOLUME_NAME.match(name):
        raise UsageError(f"invalid volume name {name!r}: use letters, digits, '.', '_', '+', '-' "
                         "(up to 128, starting with a letter or digit)")
    return name


def check_volume_size(size_bytes):
    if not isinstance(size_bytes, int) or size_bytes <= 0:
        raise UsageError("volume size must be a positive number of bytes")
    if size_bytes % BLOCK_SIZE:
        raise UsageError("volume size must be a multiple of 4096 bytes")
    if size_bytes > MAX_VOLUME_BYTES:
        raise UsageError("volume size is over the 1 PiB limit")
    return size_bytes


def first_volume_id(node_id):
    """The first id of the range of volume ids a node gives out."""
    return (node_index(node_id) << VOLUME_ID_NODE_SHIFT) | 1


def created_here(volume_id, node_id):
    """True when `volume_id` is in the range of ids `node_id` gives out."""
    return volume_id >> VOLUME_ID_NODE_SHIFT == node_index(node_id)


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


def volume_info(pool, name):
    try:
        return pool.volumes[name]
    except KeyError:
        raise NotFoundError(f"no volume named {name!r} in pool {pool.path}") from None


# ---- the table, changed by records (replayed, received or just written) -----------------
def add_volume(pool, info, persist=True):
    pool.volumes[info.name] = info
    pool.volumes_by_id[info.volume_id] = info
    if info.parent:
        pool.blockmap.parents[info.volume_id] = (info.parent["id"], info.parent["stamp"])
    if created_here(info.volume_id, pool.node_id) and info.volume_id >= pool.next_volume_id:
        pool.next_volume_id = info.volume_id + 1
    if persist:
        pool.blockmap.put_volume(info.name, info.as_dict())


def apply_volume_record(pool, record_type, volume_id, payload, hlc):
    try:
        description = json.loads(payload)
    except ValueError:
        pool.damage.append(CorruptionError(f"volume record for id {volume_id} is not JSON"))
        return
    if record_type == RecordType.VOLUME_CREATE:
        if volume_id in pool.volumes_by_id or volume_id in pool.removed_volumes:
            return  # the same record again (a mirror's resend is skipped before; replay after a rebuild),
            # or removed by another node before its creation reached this one
        primary = description.get("primary")
        info = VolumeInfo(volume_id, description["name"], description["size"], description["compression"], hlc,
                          description.get("parent"), mode=description.get("mode"),
                          primaries=[(hlc, primary)] if primary is not None else ())
        merge.settle_name(pool, info)
        add_volume(pool, info)
        return
    info = pool.volumes_by_id.get(volume_id)
    if record_type == RecordType.VOLUME_REMOVE:
        # A remove wins, wherever it arrives in the order: writes made elsewhere while
        # apart go with the volume (docs/MULTIMASTER.md).
        pool.removed_volumes[volume_id] = max(hlc, pool.removed_volumes.get(volume_id, 0))
    if info is None:
        return
    if record_type == RecordType.VOLUME_PRIMARY:
        seen = {int(node): stamp for node, stamp in description.get("seen", {}).items()}
        merge.apply_primary(pool, info, description["primary"], hlc, seen)
    elif record_type == RecordType.VOLUME_RESIZE:
        # The greatest size wins, whatever the order (sizes made apart: a volume never shrinks).
        if description["size"] > info.size_bytes:
            info.size_bytes = description["size"]
            pool.blockmap.put_volume(info.name, info.as_dict())
    else:
        del pool.volumes[info.name]
        del pool.volumes_by_id[volume_id]
        pool.snapshots.pop(volume_id, None)
        pool.blockmap.forget_volume(volume_id)
        pool.tombstones.forget_volume(volume_id)
        pool.blockmap.put_volume(info.name, None)


# ---- commands ---------------------------------------------------------------------------
def _change(pool, record_type, volume_id, description):
    payload = json.dumps(description, sort_keys=True).encode()
    _, hlc = journal.append(pool, record_type, 0, volume_id, payload, 0, 0)
    apply_volume_record(pool, record_type, volume_id, payload, hlc)
    journal.flush_point(pool)
    journal.checkpoint(pool)


def create_volume(pool, name, size_bytes, compression="none", parent=None, mode=None):
    """`mode`: for a pool with peers, "single-primary" (the default there: this node
    writes, the others serve it read-only until `volume promote`) or "multi-master"."""
    validate_volume_name(name)
    size_bytes = check_volume_size(size_bytes)
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compression!r} (use one of: {', '.join(COMPRESSIONS)})")
    if mode not in (None,) + VOLUME_MODES:
        raise UsageError(f"unknown mode {mode!r} (use one of: {', '.join(VOLUME_MODES)})")
    with pool.lock:
        if name in pool.volumes:
            raise AlreadyExistsError(f"volume {name!r} already exists")
        description = {"name": name, "size": size_bytes, "compression": compression}
        if parent is not None:
            description["parent"] = parent
        if mode is None:
            pool.peer_nodes = peer_nodes(pool.path, pool.files)  # a `peer add` may be a moment old
            if pool.peer_nodes:
                mode = "single-primary"
        if mode is not None:
            description["mode"] = mode
            if mode == "single-primary":
                description["primary"] = pool.node_id
        _change(pool, RecordType.VOLUME_CREATE, pool.next_volume_id, description)
        return pool.volumes[name]


def promote_volume(pool, name):
    """This node becomes the writer of a single-primary volume (the one that was is lost,
    or hands over). Its clients must reconnect to write."""
    with pool.lock:
        info = volume_info(pool, name)
        if info.mode != "single-primary":
            raise UsageError(f"volume {name!r} is not single-primary (every node writes it already)")
        if info.primary() == pool.node_id:
            raise UsageError(f"this node (node {pool.node_id}) is already the primary of {name!r}")
        _change(pool, RecordType.VOLUME_PRIMARY, info.volume_id,
                {"name": name, "primary": pool.node_id,
                 "seen": {str(node): stamp for node, stamp in pool.origin_stamps.items()}})
        return info


def resize_volume(pool, name, size_bytes):
    size_bytes = check_volume_size(size_bytes)
    with pool.lock:
        info = volume_info(pool, name)
        if size_bytes < info.size_bytes:
            raise OutOfRangeError(f"volume {name!r} is {info.size_bytes} bytes; shrinking is not supported")
        if size_bytes != info.size_bytes:
            _change(pool, RecordType.VOLUME_RESIZE, info.volume_id, {"name": name, "size": size_bytes})
        return info


def remove_volume(pool, name, with_snapshots=False):
    with pool.lock:
        info = volume_info(pool, name)
        users = pool.connections.count(name)
        if users:
            raise PoolBusyError(f"volume {name!r} is in use by {users} NBD connection(s); disconnect them first")
        clones = sorted(other.name for other in pool.volumes.values()
                        if other.parent and other.parent["id"] == info.volume_id)
        if clones:
            raise UsageError(f"volume {name!r} has clones ({', '.join(clones)}); remove them first")
        snapshots = pool.snapshots.get(info.volume_id)
        if snapshots and not with_snapshots:
            raise UsageError(f"volume {name!r} has {len(snapshots)} snapshots; remove them first, "
                             "or remove the volume with its snapshots (--with-snapshots)")
        _change(pool, RecordType.VOLUME_REMOVE, info.volume_id, {"name": name})
