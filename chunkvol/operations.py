"""Operations that change a pool, by name: the CLI runs them on a pool it opens itself, or,
when a server holds the pool, sends them over the server's control socket (control.py).

Each takes the open pool and JSON-able keyword arguments and returns a JSON-able result.
"""

import functools

from chunkvol import compaction, heal, history, tiering
from chunkvol.errors import AlreadyExistsError, UsageError


def _user_change(operation):
    """Changes a user makes; a mirror refuses them (it follows its source)."""
    @functools.wraps(operation)
    def checked(pool, *arguments, **keywords):
        pool.check_changeable()
        return operation(pool, *arguments, **keywords)
    return checked


@_user_change
def volume_create(pool, name, size, compression="none", mode=None):
    return pool.create_volume(name, size, compression, mode=mode).as_dict()


@_user_change
def volume_promote(pool, name):
    return pool.promote_volume(name).as_dict()


@_user_change
def volume_resize(pool, name, size):
    return pool.resize_volume(name, size).as_dict()


@_user_change
def volume_remove(pool, name, with_snapshots=False):
    pool.remove_volume(name, with_snapshots=with_snapshots)
    return {"name": name}


@_user_change
def snapshot_create(pool, points):
    """Several snapshots in one call: `chunkvol snapshot create v@a v@b ...`."""
    with pool.lock:  # all or none: every name is checked before the first is taken
        wanted = [history.split_point(point) for point in points]
        for volume, name in wanted:
            history.validate_snapshot_name(name)
            if name in pool.snapshots.get(pool.volume_info(volume).volume_id, {}):
                raise AlreadyExistsError(f"volume {volume!r} already has a snapshot {name!r}")
        if len(set(wanted)) != len(wanted):
            raise UsageError("the same snapshot is named twice")
        made = []
        for volume, name in wanted:
            snapshot = history.create_snapshot(pool, volume, name)
            made.append({"point": f"{volume}@{name}", "stamp": snapshot["stamp"],
                         "time": history.format_stamp(snapshot["stamp"])})
        return made


@_user_change
def snapshot_remove(pool, point):
    volume, name = history.split_point(point)
    history.remove_snapshot(pool, volume, name)
    return {"point": point}


@_user_change
def snapshot_rollback(pool, point):
    target, before, after = history.rollback(pool, point)
    return {"point": point, "target_stamp": target.stamp, "before_stamp": before, "rollback_stamp": after,
            "undo_with": f"{target.info.name}@{history.format_point(before)}"}


@_user_change
def snapshot_clone(pool, point, name):
    return history.clone(pool, point, name).as_dict()


@_user_change
def prune(pool, volumes, keep_seconds=None):
    names = volumes or sorted(pool.volumes)
    return {name: history.prune(pool, name, keep_seconds) for name in names}


def retention(pool, all_seconds=None, hourly_seconds=None, daily_seconds=None):
    if all_seconds is None and hourly_seconds is None and daily_seconds is None:
        return history.retention_policy(pool)
    return history.set_retention(pool, all_seconds, hourly_seconds, daily_seconds)


def compact(pool, min_dead=None):
    return compaction.compact(pool, min_dead=min_dead)


def scrub(pool):
    return heal.scrub(pool)


def chunk_switch(pool, chunk_id):
    """Tiering: read an uploaded chunk from its store from now on and delete its file."""
    return tiering.switch(pool, chunk_id)


def become_writer(pool):
    """`peer add` on a node that joined as a mirror: it writes too from now on."""
    return pool.become_writer()


def log_horizon(pool):
    """For a shipper in another process: a flush point for what was written, then how far
    this node's log is durable (it ships only that much, read from the files)."""
    pool.heartbeat()  # first: the flush below makes it durable, so it ships in this same pass
    pool.flush()
    with pool.lock:
        return {"durable": pool.writer.durable_address, "next_sequence": pool.next_sequence,
                "node": pool.node_id}


OPERATIONS = {function.__name__: function for function in (
    volume_create, volume_promote, volume_resize, volume_remove, snapshot_create, snapshot_remove, snapshot_rollback,
    snapshot_clone, prune, retention, compact, scrub, chunk_switch, become_writer, log_horizon)}
