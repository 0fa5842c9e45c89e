"""History: flush points, named snapshots, past-point views, rollback, clones, pruning.

Nothing in the log is overwritten, and the block map keeps one version of a group per flush
point, keyed by the flush point's stamp; so the volume as of any stamp is "the newest version
at or before it" of each group, one seek per group however deep the history.

A point is written `VOL@NAME` (a named snapshot) or `VOL@YYYY-MM-DDTHH:MM:SS[.fff]Z` (the volume
as of that UTC moment: its newest flush point at or before it; only flushed writes are part of a
point). Snapshot, rollback and prune are records in the log (format/record.py), applied by the
same functions live and at replay, so a rebuilt block map has the same history.
"""

import json
import os
import re
import time
from datetime import datetime, timezone
from typing import NamedTuple

from chunkvol.clock import COUNTER_BITS, hlc_to_seconds
from chunkvol.errors import AlreadyExistsError, CorruptionError, NotFoundError, PoolBusyError, UsageError
from chunkvol.format import group_map, pool_metadata
from chunkvol.format.record import GROUP_SIZE, HEADER_SIZE, RecordType
from chunkvol.space import live_groups

SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
TIME_POINT = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d{1,6})?Z(?:~(\d{1,5}))?$")
SCAN_BATCH = 4096
# Default retention (pool.json "retention" overrides): every flush point for an hour, then the
# last of each hour for a day, then the last of each day for 30 days; named snapshots always.
DEFAULT_RETENTION = {"all": 3600, "hourly": 86400, "daily": 30 * 86400}
RETENTION_INTERVAL = 600.0  # seconds between automatic retention passes of a server


class Point(NamedTuple):
    info: object          # the volume's VolumeInfo
    stamp: int            # read the newest versions at or before this stamp
    size_bytes: int
    label: str            # "VOL@NAME" or "VOL@TIME"
    snapshot: object      # the snapshot's name, or None for a time


def format_stamp(stamp):
    moment = datetime.fromtimestamp(hlc_to_seconds(stamp), timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_point(stamp):
    """A time that names exactly this stamp: several flush points can share a millisecond, so
    the clock's counter follows as `~N` (`VOL@2026-11-24T15:04:05.123Z~2`)."""
    return f"{format_stamp(stamp)}~{stamp & ((1 << COUNTER_BITS) - 1)}"


def stamp_of_time(text):
    """The largest stamp inside the UTC moment `text` (to the millisecond), or exactly the
    stamp `TIME~N` names."""
    match = TIME_POINT.match(text)
    if not match:
        raise UsageError(f"{text!r} is not a UTC time like 2026-11-24T15:04:05Z")
    try:
        moment = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        raise UsageError(f"{text!r} is not a valid time") from None
    fraction = match.group(2) or ""
    millis = int(moment.timestamp()) * 1000 + (int((fraction[1:] + "000")[:3]) if fraction else 0)
    if match.group(3) is not None:
        counter = int(match.group(3))
        if counter >= 1 << COUNTER_BITS:
            raise UsageError(f"{text!r}: the counter after ~ must be below {1 << COUNTER_BITS}")
        return (millis << COUNTER_BITS) | counter
    return (millis << COUNTER_BITS) | ((1 << COUNTER_BITS) - 1)


def validate_snapshot_name(name):
    if not isinstance(name, str) or not SNAPSHOT_NAME.match(name):
        raise UsageError(f"invalid snapshot name {name!r}: use letters, digits, '.', '_', '+', '-' "
                         "(up to 128, starting with a letter or digit)")
    return name


def split_point(spec):
    """'VOL@WHAT' -> ('VOL', 'WHAT')."""
    volume, at, what = spec.partition("@")
    if not at or not volume or not what:
        raise UsageError(f"{spec!r} is not a point: use VOLUME@SNAPSHOT or VOLUME@YYYY-MM-DDTHH:MM:SSZ")
    return volume, what


def resolve_point(pool, spec):
    """The Point a spec names. Hold the pool lock."""
    name, what = split_point(spec)
    info = pool.volume_info(name)
    if "T" in what and ":" in what:
        bound = stamp_of_time(what)
        if hlc_to_seconds(bound) > time.time() + 1:
            raise UsageError(f"{spec}: that time is in the future")
        if bound < info.created_hlc:
            raise UsageError(f"{spec}: volume {name!r} was created later ({format_stamp(info.created_hlc)})")
        if bound < info.retained_from:
            raise UsageError(f"{spec}: before the retention window (history of {name!r} is kept from "
                             f"{format_stamp(info.retained_from)}; snapshots: `chunkvol snapshot list {name}`)")
        return Point(info, _snap_to_point(pool, info, bound), info.size_bytes, spec, None)
    validate_snapshot_name(what)
    snapshot = pool.snapshots.get(info.volume_id, {}).get(what)
    if snapshot is None:
        raise NotFoundError(f"volume {name!r} has no snapshot {what!r}")
    return Point(info, snapshot["stamp"], snapshot["size"], spec, what)


def _snap_to_point(pool, info, bound):
    """The newest stamp at or before `bound` at which the volume is a whole retained point:
    a flush point in its history, a snapshot, or a pruning boundary. (Reading at a stamp
    between thinned-out points could mix two of them.)"""
    candidates = [info.created_hlc]
    flush_point = pool.blockmap.last_flush_point(info.volume_id, bound)
    if flush_point is not None:
        candidates.append(flush_point)
    for snapshot in pool.snapshots.get(info.volume_id, {}).values():
        if snapshot["stamp"] <= bound:
            candidates.append(snapshot["stamp"])
    for boundary in (info.retained_from, info.detail_from):
        if boundary and boundary <= bound:
            candidates.append(boundary)
    return max(candidates)


# ---- changes: each is a record, applied by apply_record live and at replay -------------------
def create_snapshot(pool, volume_name, snapshot_name):
    """A named snapshot of the volume's content now: a flush point, then a SNAPSHOT record
    whose stamp is newer than every write before it. O(1): nothing is copied."""
    validate_snapshot_name(snapshot_name)
    with pool.lock:
        info = pool.volume_info(volume_name)
        if snapshot_name in pool.snapshots.get(info.volume_id, {}):
            raise AlreadyExistsError(f"volume {volume_name!r} already has a snapshot {snapshot_name!r}")
        pool.flush_point()
        created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        _log(pool, RecordType.SNAPSHOT, info.volume_id,
             {"op": "create", "name": snapshot_name, "size": info.size_bytes, "created": created})
        return pool.snapshots[info.volume_id][snapshot_name]


def remove_snapshot(pool, volume_name, snapshot_name):
    with pool.lock:
        info = pool.volume_info(volume_name)
        if snapshot_name not in pool.snapshots.get(info.volume_id, {}):
            raise NotFoundError(f"volume {volume_name!r} has no snapshot {snapshot_name!r}")
        clones = sorted(other.name for other in pool.volumes.values() if other.parent
                        and other.parent["id"] == info.volume_id and other.parent["snapshot"] == snapshot_name)
        if clones:
            raise UsageError(f"snapshot {volume_name}@{snapshot_name} has clones ({', '.join(clones)}); "
                             "remove them first")
        _log(pool, RecordType.SNAPSHOT, info.volume_id, {"op": "remove", "name": snapshot_name})


def rollback(pool, spec):
    """The live volume shows a past point's content again. The rollback is itself a new flush
    point, so the content just before it stays readable (and can be rolled back to)."""
    with pool.lock:
        point = resolve_point(pool, spec)
        if point.info.mode == "multi-master":
            # Another node's older writes may still arrive and win over the rolled-back blocks
            # there but not here: the nodes would part. A clone of the point is the same data.
            raise UsageError(f"volume {point.info.name!r} is multi-master: a rollback could part its nodes; "
                             f"`chunkvol snapshot clone {spec} NEWVOL` gives that content as a volume")
        if pool.connections.count(point.info.name, live_only=True):
            raise PoolBusyError(f"volume {point.info.name!r} has {pool.connections.count(point.info.name, True)} NBD "
                                "connection(s): disconnect them first (a filesystem or VM on it would see its "
                                "disk change underneath)")
        before, after = rollback_to_stamp(pool, point.info, point.stamp, spec)
        return point, before, after


def rollback_to_stamp(pool, info, stamp, label):
    """Returns the stamps of the flush points just before and just after the rollback."""
    with pool.lock:
        before = pool.flush_point()
        _log(pool, RecordType.ROLLBACK, info.volume_id, {"stamp": stamp, "label": label}, sync=False)
        after = pool.flush_point()
        pool.checkpoint()
        return before, after


def clone(pool, spec, new_name):
    """A writable volume that shares every block of a snapshot (no copy): its groups are read
    from the parent as of the snapshot until written."""
    with pool.lock:
        point = resolve_point(pool, spec)
        if point.snapshot is None:
            raise UsageError(f"{spec}: clone a snapshot (VOLUME@SNAPSHOT); take one of that time first")
        pool.create_volume(new_name, point.size_bytes, point.info.compression,
                           parent={"id": point.info.volume_id, "stamp": point.stamp, "snapshot": point.snapshot})
        return pool.volumes[new_name]


def prune(pool, volume_name, keep_seconds=None, now=None):
    """Release the volume's history older than `keep_seconds` (None: the pool's retention
    policy). Snapshots, and the snapshots clones hang from, are always kept. Returns the
    number of flush points released."""
    now = time.time() if now is None else now
    with pool.lock:
        info = pool.volume_info(volume_name)
        pool.flush_point()
        if keep_seconds is None:
            before, keep, retained_from = _policy_points(pool, info, now)
        else:
            if keep_seconds < 0:
                raise UsageError("--keep must not be negative")
            before = _stamp_at(now - keep_seconds)
            keep, retained_from = [], before
        # Points open connections read stay, as snapshots do; in the record, so that replay,
        # mirrors and peers keep the same versions.
        being_read = pool.connections.points_being_read(info.volume_id)
        keep = sorted(set(keep) | {stamp for stamp in being_read if stamp < before})
        held = set(keep) | set(held_stamps(pool, info.volume_id))
        released = [stamp for stamp, _, _ in pool.blockmap.history(info.volume_id, 0, before - 1)
                    if stamp not in held]
        if not released:
            return 0
        retained_from = max(retained_from, info.retained_from)
        _log(pool, RecordType.PRUNE, info.volume_id,
             {"before": before, "keep": sorted(keep), "retained_from": retained_from}, sync=False)
        pool.flush_point()
        pool.checkpoint()
        return len(released)


def apply_retention(pool, now=None):
    """The pool's retention policy on every volume (a server runs this now and then)."""
    return {name: prune(pool, name, None, now) for name in sorted(pool.volumes)}


def held_stamps(pool, volume_id):
    """Stamps whose content must stay: the volume's snapshots (clones hang from snapshots)."""
    return [snapshot["stamp"] for snapshot in pool.snapshots.get(volume_id, {}).values()]


def retention_policy(pool):
    policy = dict(DEFAULT_RETENTION)
    policy.update(pool.fields.get("retention") or {})
    return policy


def set_retention(pool, all_seconds=None, hourly_seconds=None, daily_seconds=None):
    """Change the pool's retention policy (pool.json); unnamed parts stay as they are."""
    with pool.lock:
        if pool.readonly:
            raise UsageError("the pool is open read-only")
        policy = retention_policy(pool)
        for key, value in (("all", all_seconds), ("hourly", hourly_seconds), ("daily", daily_seconds)):
            if value is not None:
                if not isinstance(value, int) or value < 0:
                    raise UsageError(f"retention {key} must be a non-negative number of seconds")
                policy[key] = value
        if not policy["all"] <= policy["hourly"] <= policy["daily"]:
            raise UsageError("retention must keep every point <= hourly points <= daily points "
                             f"(got {policy['all']}s, {policy['hourly']}s, {policy['daily']}s)")
        fields = dict(pool.fields, retention=policy)
        fields.pop("checksum", None)
        pool.files.publish(os.path.join(pool.path, "pool.json"), pool_metadata.encode(fields))
        pool.fields = pool_metadata.decode(pool_metadata.encode(fields))
        return policy


def _policy_points(pool, info, now):
    policy = retention_policy(pool)
    before = _stamp_at(now - policy["all"])
    hourly_from = _stamp_at(now - policy["hourly"])
    daily_from = _stamp_at(now - policy["daily"])
    buckets = {}
    for stamp, _, _ in pool.blockmap.history(info.volume_id, daily_from, before - 1):
        seconds = int(hlc_to_seconds(stamp))
        bucket = ("h", seconds // 3600) if stamp >= hourly_from else ("d", seconds // 86400)
        buckets[bucket] = max(buckets.get(bucket, 0), stamp)  # the last point of each hour or day
    keep = sorted(buckets.values())
    return before, keep, keep[0] if keep else before


def _stamp_at(seconds):
    return max(0, int(seconds * 1000)) << COUNTER_BITS


def _log(pool, record_type, volume_id, description, sync=True):
    payload = json.dumps(description, sort_keys=True).encode()
    _, stamp = pool.append(record_type, 0, volume_id, payload, 0, 0)
    apply_record(pool, record_type, volume_id, payload, stamp, pool.node_id)
    if sync:
        pool.writer.sync()


def apply_record(pool, record_type, volume_id, payload, stamp, node):
    """A SNAPSHOT, ROLLBACK or PRUNE record, live or replayed."""
    try:
        description = json.loads(payload)
    except ValueError:
        pool.damage.append(CorruptionError(f"history record of volume id {volume_id} is not JSON"))
        return
    info = pool.volumes_by_id[volume_id]
    blockmap = pool.blockmap
    if record_type == RecordType.SNAPSHOT:
        snapshots = pool.snapshots.setdefault(volume_id, {})
        name = description["name"]
        if description["op"] == "create":
            snapshots[name] = {"name": name, "stamp": stamp, "size": description["size"],
                               "created": description["created"]}
            blockmap.put_snapshot(volume_id, name, snapshots[name])
        else:
            snapshots.pop(name, None)
            blockmap.put_snapshot(volume_id, name, None)
    elif record_type == RecordType.ROLLBACK:
        _roll_back_groups(pool, info, description["stamp"], stamp, node)
    elif record_type == RecordType.PRUNE:
        # Snapshots are held as they are at this point of the log (live and at replay alike).
        keep = set(description["keep"]) | set(held_stamps(pool, volume_id))
        blockmap.prune(volume_id, description["before"], sorted(keep))
        info.retained_from = description["retained_from"]
        info.detail_from = description["before"]
        blockmap.put_volume(info.name, info.as_dict())


def _roll_back_groups(pool, info, target_stamp, stamp, node):
    """Set every group the volume (or its parent) ever had to its version as of target_stamp."""
    blockmap = pool.blockmap
    txn = blockmap.reader()
    volume_id = info.volume_id
    end = -(-info.size_bytes // GROUP_SIZE)
    group = 0
    while group < end:
        batch = blockmap.groups_in(txn, volume_id, group, end, SCAN_BATCH)
        if not batch:
            break
        for found in batch:
            target = blockmap.stored_state(txn, volume_id, found, target_stamp) or group_map.EMPTY_STATE
            current = blockmap.get(txn, volume_id, found) or group_map.EMPTY_STATE
            if current != target:
                blockmap.update(volume_id, found, target, stamp, node)
        group = batch[-1] + 1


# ---- reading: history, snapshots, diff, space -----------------------------------------------
def history_rows(pool, volume_name):
    with pool.lock:
        info = pool.volume_info(volume_name)
        rows = [{"stamp": stamp, "time": format_stamp(stamp), "point": f"{volume_name}@{format_point(stamp)}",
                 "bytes_written": written}
                for stamp, written, _ in pool.blockmap.history(info.volume_id)]
    return rows


def snapshot_rows(pool, volume_name):
    """Snapshots of a volume, oldest first, with the bytes only each one holds."""
    with pool.lock:
        info = pool.volume_info(volume_name)
        snapshots = sorted(pool.snapshots.get(info.volume_id, {}).values(), key=lambda s: s["stamp"])
        unique = _bytes_held_only_by(pool, info, [s["stamp"] for s in snapshots])
        peers = set(pool.peer_nodes) | set(pool.origins) if pool.peer_nodes else set()
        return [{"name": s["name"], "time": format_stamp(s["stamp"]), "created": s["created"],
                 "stamp": s["stamp"], "size": s["size"], "unique_bytes": unique.get(s["stamp"], 0),
                 "waiting_for": sorted(peer for peer in peers if pool.origin_stamps.get(peer, 0) < s["stamp"])}
                for s in snapshots]


def _bytes_held_only_by(pool, info, stamps):
    """{stamp: bytes of records that the volume at that stamp uses and neither the live volume
    nor any other of `stamps` does}: what removing that snapshot alone could free."""
    if not stamps:
        return {}
    ordered = sorted(stamps, reverse=True)
    users = {}  # record address -> (stored bytes, set of points using it; None = live)
    group = None
    versions = []
    for found, stamp, state in sorted(pool.blockmap.versions_of(info.volume_id),
                                      key=lambda item: (item[0], -item[1])):
        if found != group:
            _count_users(versions, ordered, users)
            group, versions = found, []
        versions.append((stamp, state))
    _count_users(versions, ordered, users)
    held = {}
    for stored, points in users.values():
        if len(points) == 1 and None not in points:
            stamp = next(iter(points))
            held[stamp] = held.get(stamp, 0) + stored
    return held


def _count_users(versions, ordered_stamps, users):
    """versions: one group's [(stamp, state)], newest first."""
    if not versions:
        return
    seen = [(None, versions[0][1])]  # the live state is the newest version
    index = 0
    for stamp in ordered_stamps:
        while index < len(versions) and versions[index][0] > stamp:
            index += 1
        if index < len(versions):
            seen.append((stamp, versions[index][1]))
    for point, (_, refs) in seen:
        for address, stored_length, _, _ in refs:
            entry = users.get(address)
            if entry is None:
                users[address] = (HEADER_SIZE + stored_length, {point})
            else:
                entry[1].add(point)


def history_space(pool):
    """Per volume: bytes held only by history (records no live state uses but some version
    does), and the log bytes no version references at all (what compaction could reclaim)."""
    with pool.lock:
        referenced = {}
        per_volume = {}
        for name, info in sorted(pool.volumes.items()):
            live = set()
            for _, (_, refs) in live_groups(pool, info.volume_id):
                live.update(address for address, _, _, _ in refs)
            history_only = 0
            for _, _, (_, refs) in pool.blockmap.versions_of(info.volume_id):
                for address, stored_length, _, _ in refs:
                    if address not in referenced:
                        referenced[address] = HEADER_SIZE + stored_length
                        if address not in live:
                            history_only += HEADER_SIZE + stored_length
            per_volume[name] = {"history_bytes": history_only,
                                "snapshots": len(pool.snapshots.get(info.volume_id, {}))}
        return per_volume, sum(referenced.values())


def diff(pool, spec_from, spec_to=None):
    """[(offset, length, is_data)] of the byte ranges whose content differs between two points
    of a volume (`spec_to` None: the live volume), in order; is_data False: a hole at `to`."""
    with pool.lock:
        start = resolve_point(pool, spec_from)
        info = start.info
        if spec_to is not None:
            end_point = resolve_point(pool, spec_to)
            if end_point.info is not info:
                raise UsageError(f"{spec_from} and {spec_to} are points of different volumes")
            end_stamp, size = end_point.stamp, end_point.size_bytes
        else:
            end_stamp, size = None, info.size_bytes
        blockmap = pool.blockmap
        txn = blockmap.reader()
        result = []
        end_group = -(-size // GROUP_SIZE)
        group = 0
        while group < end_group:
            batch = blockmap.groups_in(txn, info.volume_id, group, end_group, SCAN_BATCH)
            if not batch:
                break
            for found in batch:
                old = blockmap.stored_state(txn, info.volume_id, found, start.stamp) or group_map.EMPTY_STATE
                if end_stamp is None:
                    new = blockmap.get(txn, info.volume_id, found) or group_map.EMPTY_STATE
                else:
                    new = blockmap.stored_state(txn, info.volume_id, found, end_stamp) or group_map.EMPTY_STATE
                if old != new:
                    _diff_group(found, old, new, result)
            group = batch[-1] + 1
        # Blocks beyond the old size (a resize) are new too when they hold data: covered above.
        return [(offset, min(length, size - offset), data) for offset, length, data in result if offset < size]


def _block_source(state, index):
    slots, refs = state
    slot = slots[index]
    if slot == group_map.HOLE:
        return None
    address, _, _, _ = refs[slot >> 4]
    return address, slot & 0x0F


def _diff_group(group, old, new, result):
    old_slots, _ = old
    block_size = GROUP_SIZE // len(old_slots)
    for index in range(len(old_slots)):
        new_source = _block_source(new, index)
        if _block_source(old, index) == new_source:
            continue
        offset = group * GROUP_SIZE + index * block_size
        data = new_source is not None
        if result and result[-1][0] + result[-1][1] == offset and result[-1][2] == data:
            result[-1] = (result[-1][0], result[-1][1] + block_size, data)
        else:
            result.append((offset, block_size, data))
