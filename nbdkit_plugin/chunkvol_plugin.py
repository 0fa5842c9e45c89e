#!/usr/bin/nbdkit python
# chunkvol's nbdkit plugin: every volume of a pool is an NBD export named after it, and every
# past point of one is a read-only export: VOL@SNAPSHOT, or VOL@2026-11-24T15:04:05Z (as of then).
#
#   nbdkit -f -U /tmp/nbd.sock python nbdkit_plugin/chunkvol_plugin.py pool=/path/to/pool \
#          [volume=NAME] [readonly=true] [thread_model=serialize|parallel] [cache=writeback|none]
#          [listen=HOST:PORT] [http=HOST:PORT] [log_format=text|json]
#
# A thin adapter: it checks its keys, opens the pool after nbdkit forks (LMDB must not cross
# a fork), and maps chunkvol's errors to errno. The work is in the chunkvol package.

import ctypes
import errno
import functools
import os
import site
import sys
import threading
from time import monotonic_ns

import nbdkit

API_VERSION = 2


def _add_project_paths():
    """Make the chunkvol package importable from nbdkit's embedded /usr/bin/python3: the
    checkout (this file's parent) and its .venv's site-packages."""
    script = os.path.abspath(_add_project_paths.__code__.co_filename)
    root = os.path.dirname(os.path.dirname(script))
    if root not in sys.path:
        sys.path.insert(0, root)
    lib = os.path.join(root, ".venv", "lib")
    if os.path.isdir(lib):
        for name in sorted(os.listdir(lib)):
            site.addsitedir(os.path.join(lib, name, "site-packages"))


_add_project_paths()

from chunkvol import errors, heal  # noqa: E402
from chunkvol.control import ControlServer  # noqa: E402
from chunkvol.monitor.counters import RequestCounts  # noqa: E402
from chunkvol.monitor.errors import ErrorCounts, kind_of  # noqa: E402
from chunkvol.monitor.log import EventLog  # noqa: E402
from chunkvol.pool import Pool  # noqa: E402
from chunkvol.volume import open_volume  # noqa: E402

KEYS = ("pool", "volume", "readonly", "thread_model", "cache", "listen", "http", "log_format")
# serialize: each connection's requests one at a time, on that connection's own thread (nbdkit's
# serialize_requests); measured here 2x (4 KiB random writes), 2.8x (random reads) and 1.9x
# (writes with a flush every 32) over parallel, whose GIL hand-offs cost more than fdatasync
# stalls. Not serialize_all_requests: nbdkit 1.32 holds that model's one lock through every
# connection's handshake, so one client silent in its handshake stopped every other.
settings = {"pool": None, "volume": None, "readonly": False, "thread_model": "serialize", "cache": None,
            "listen": None, "http": None, "log_format": "text"}
state = {"pool": None, "control": None, "receiver": None, "monitor": None}
# What `serve --http` shows (chunkvol/monitor): counted here, where the requests are.
requests = RequestCounts()
failures = ErrorCounts()

ERRNO = (
    (errors.OutOfRangeError, errno.EINVAL),
    (errors.ReadOnlyError, errno.EPERM),
    (errors.OutOfSpaceError, errno.ENOSPC),
    (errors.NotFoundError, errno.ENOENT),
    (errors.CorruptionError, errno.EIO),
    (errors.DeviceFailedError, errno.EIO),
    (errors.UsageError, errno.EINVAL),
)


# Which of the client's errors are the server's failures, for chunkvol_errors_total; a bad
# request (out of range, read-only, no such export) is the client's and not counted.
FAILURES = (errors.CorruptionError, errors.DeviceFailedError, errors.OutOfSpaceError, errors.PeerError,
            errors.UnreachableError, errors.AccessDeniedError)


def _fail(error):
    """Set the errno for an exception and let nbdkit report it."""
    if isinstance(error, FAILURES):
        failures.count("store" if isinstance(error, errors.UnreachableError) else kind_of(error))
    for kind, number in ERRNO:
        if isinstance(error, kind):
            nbdkit.set_error(number)
            break
    else:
        nbdkit.set_error(errno.EIO)
    nbdkit.debug(f"chunkvol: {error}")


def _truth(value):
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def dump_plugin():
    try:
        from chunkvol import FORMAT_VERSION, __version__
        print(f"chunkvol_version={__version__}")
        print(f"chunkvol_format_version={FORMAT_VERSION}")
    except Exception as error:  # an exception here crashes nbdkit 1.32
        print(f"chunkvol_error={error}")


def config(key, value):
    if key not in KEYS:
        raise RuntimeError(f"chunkvol: unknown parameter {key!r} (known: {', '.join(KEYS)})")
    if key == "pool":
        settings["pool"] = os.path.abspath(value)  # nbdkit changes directory to / later
    elif key == "readonly":
        settings["readonly"] = _truth(value)
    elif key == "thread_model":
        if value not in ("parallel", "serialize"):
            raise RuntimeError("chunkvol: thread_model must be parallel or serialize")
        settings["thread_model"] = value
    elif key == "cache":
        if value not in ("writeback", "none"):
            raise RuntimeError("chunkvol: cache must be writeback or none")
        settings["cache"] = value
    elif key == "log_format":
        if value not in ("text", "json"):
            raise RuntimeError("chunkvol: log_format must be text or json")
        settings["log_format"] = value
    else:
        settings[key] = value


def config_complete():
    if settings["pool"] is None:
        raise RuntimeError("chunkvol: the pool=PATH parameter is required")
    try:
        Pool.read_metadata(settings["pool"])  # a missing or foreign pool fails here, before serving
    except errors.ChunkvolError as error:
        raise RuntimeError(f"chunkvol: {error}") from None


def thread_model():
    if settings["thread_model"] == "serialize":
        return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS
    return nbdkit.THREAD_MODEL_PARALLEL


def after_fork():
    try:
        state["pool"] = Pool.open(settings["pool"], readonly=settings["readonly"], cache=settings["cache"])
    except errors.ChunkvolError as error:
        raise RuntimeError(f"chunkvol: {error}") from None
    if settings["volume"] and settings["volume"] not in state["pool"].volumes:
        raise RuntimeError(f"chunkvol: volume={settings['volume']}: no such volume in the pool "
                           f"(it has: {', '.join(sorted(state['pool'].volumes)) or 'none'})")
    for damage in state["pool"].damage:
        nbdkit.debug(f"chunkvol: damage found while opening the pool: {damage}")
    if not settings["readonly"]:
        # `chunkvol snapshot create` and the other changes reach the pool through this.
        try:
            state["control"] = ControlServer(state["pool"]).start()
        except (OSError, errors.ChunkvolError) as error:
            nbdkit.debug(f"chunkvol: no control socket, changes need the server stopped: {error}")
    log = EventLog(settings["log_format"], stamped=False)
    if settings["listen"]:
        # Other nodes' batches arrive here (mirror/node_link.py), beside the NBD exports.
        from chunkvol.mirror.node_link import ReceiverServer
        host, _, port = settings["listen"].rpartition(":")
        try:
            state["receiver"] = ReceiverServer(state["pool"], host.strip("[]"), int(port),
                                               log=log.receiver_line).start()
        except (OSError, ValueError, errors.ChunkvolError) as error:
            raise RuntimeError(f"chunkvol: listen={settings['listen']}: {error}") from None
    if settings["http"]:
        # /metrics and the status page, read-only (chunkvol/monitor/web.py).
        from chunkvol.monitor.web import MonitorServer
        host, _, port = settings["http"].rpartition(":")
        try:
            state["monitor"] = MonitorServer(state["pool"], host.strip("[]"), int(port), requests, failures,
                                             receiver=state["receiver"]).start()
        except (OSError, ValueError, errors.ChunkvolError) as error:
            raise RuntimeError(f"chunkvol: http={settings['http']}: {error}") from None
        log.event("info", "http.listening", f"metrics and status page at http://{settings['http']}/",
                  address=settings["http"])


def cleanup():
    if state["monitor"] is not None:
        state["monitor"].stop()
        state["monitor"] = None
    if state["receiver"] is not None:
        state["receiver"].stop()
        state["receiver"] = None
    if state["control"] is not None:
        state["control"].stop()
        state["control"] = None
    if state["pool"] is not None:
        state["pool"].close()
        state["pool"] = None


def list_exports(readonly, is_tls):
    pool = state["pool"]
    with pool.lock:
        exports = []
        for name in sorted(pool.volumes):
            exports.append((name, f"chunkvol volume {name}"))
            snapshots = pool.snapshots.get(pool.volumes[name].volume_id, {})
            for snapshot in sorted(snapshots.values(), key=lambda s: s["stamp"]):
                exports.append((f"{name}@{snapshot['name']}",
                                f"snapshot of {name} taken {snapshot['created']} (read-only)"))
    return exports


def default_export(readonly, is_tls):
    if settings["volume"]:
        return settings["volume"]
    names = sorted(state["pool"].volumes)
    return names[0] if len(names) == 1 else ""


class Connection:
    """nbdkit's handle: the volume a client opened, and the counts of its requests."""
    __slots__ = ("volume", "counts")

    def __init__(self, volume):
        self.volume = volume
        self.counts = requests.connect(volume.info.name)


def open(readonly):  # noqa: A001 (nbdkit's callback name)
    name = nbdkit.export_name() or settings["volume"] or ""
    if not name:
        names = sorted(state["pool"].volumes)
        if len(names) != 1:
            nbdkit.set_error(errno.ENOENT)
            raise RuntimeError("chunkvol: name an export (a volume); the pool has "
                               f"{len(names)} volumes")
        name = names[0]
    try:
        # A read that meets a damaged record heals it from a mirror, or fails with EIO.
        volume = open_volume(state["pool"], name, readonly=readonly or settings["readonly"], heal=heal.heal_read)
    except errors.ChunkvolError as error:
        _fail(error)
        raise
    state["pool"].connections.attach(volume.info.name, live=volume.point is None, point=volume.point)
    return Connection(volume)


def close(connection):
    _unpin()
    requests.disconnect(connection.counts)
    volume = connection.volume
    if state["pool"] is not None:
        state["pool"].connections.detach(volume.info.name, live=volume.point is None, point=volume.point)


def export_description(connection):
    volume = connection.volume
    if volume.point is not None:
        return f"chunkvol volume {volume.info.name} as of {volume.point.label.partition('@')[2]} (read-only)"
    return f"chunkvol volume {volume.name} ({volume.info.compression})"


def get_size(connection):
    return connection.volume.size_bytes


def block_size(connection):
    return (1, 4096, 32 * 1024 * 1024)


def is_rotational(connection):
    return False


def can_write(connection):
    return not connection.volume.readonly


def can_flush(connection):
    return True


def can_fua(connection):
    return nbdkit.FUA_NATIVE


def can_trim(connection):
    return True


def can_zero(connection):
    return True


def can_fast_zero(connection):
    return True


def can_extents(connection):
    return True


def can_cache(connection):
    return nbdkit.CACHE_NATIVE


def can_multi_conn(connection):
    # One pool object serves every connection in this process, and flush syncs the whole
    # log, so a flush on one connection covers writes acknowledged on all of them.
    return True


# nbdkit takes the GIL with PyGILState_Ensure for every call. On its connection threads that
# creates a Python thread state and destroys it again each time: an mmap, a munmap and the
# setup, measured here as ~40 % of a 4 KiB read's server CPU. One extra Ensure, made on the
# connection's first request and released by close (serialize runs a connection on one
# thread), keeps the state for the connection's life: 4 KiB random reads went 21-25k -> 40k IOPS.
_pinned = threading.local()
_ensure, _release = ctypes.pythonapi.PyGILState_Ensure, ctypes.pythonapi.PyGILState_Release
_ensure.restype, _release.argtypes = ctypes.c_int, [ctypes.c_int]


def _pin():
    if settings["thread_model"] == "serialize":
        _pinned.state = _ensure()


def _unpin():
    pinned = getattr(_pinned, "state", None)
    if pinned is not None:
        _pinned.state = None
        _release(pinned)


def _translated(callback):
    """Data-path callbacks: chunkvol errors become the errno the client sees."""
    @functools.wraps(callback)
    def wrapper(*arguments):
        if getattr(_pinned, "state", None) is None:
            _pin()
        try:
            return callback(*arguments)
        except errors.ChunkvolError as error:
            _fail(error)
            raise
    return wrapper


# Each counted callback times itself with monotonic_ns and bins the duration by its
# bit_length (monitor/counters.py): a failed request raises before it is counted.
@_translated
def pread(connection, buf, offset, flags):
    started = monotonic_ns()
    connection.volume.read(buf, offset)
    elapsed = monotonic_ns() - started
    counts = connection.counts
    counts.read_bytes += len(buf)
    op = counts.read
    op.buckets[elapsed.bit_length()] += 1
    op.sum_ns += elapsed


@_translated
def pwrite(connection, buf, offset, flags):
    started = monotonic_ns()
    fua = flags & nbdkit.FLAG_FUA
    connection.volume.write(buf, offset, fua=bool(fua))
    elapsed = monotonic_ns() - started
    counts = connection.counts
    counts.written_bytes += len(buf)
    if fua:
        counts.flush_points += 1
    op = counts.write
    op.buckets[elapsed.bit_length()] += 1
    op.sum_ns += elapsed


def _counted(counts, op, started, flush_point):
    """The end of a request that is not on the hot path (flush, trim, zero): a call is cheap
    beside its cost."""
    elapsed = monotonic_ns() - started
    if flush_point:
        counts.flush_points += 1
    op.buckets[elapsed.bit_length()] += 1
    op.sum_ns += elapsed


@_translated
def flush(connection, flags):
    started = monotonic_ns()
    connection.volume.flush()
    _counted(connection.counts, connection.counts.flush, started, True)


@_translated
def trim(connection, count, offset, flags):
    started = monotonic_ns()
    fua = flags & nbdkit.FLAG_FUA
    connection.volume.trim(offset, count, fua=bool(fua))
    _counted(connection.counts, connection.counts.trim, started, fua)


@_translated
def zero(connection, count, offset, flags):
    started = monotonic_ns()
    fua = flags & nbdkit.FLAG_FUA
    connection.volume.zero(offset, count, fua=bool(fua))
    _counted(connection.counts, connection.counts.zero, started, fua)


@_translated
def extents(connection, count, offset, flags):
    found = connection.volume.extents(offset, count)
    return found[:1] if flags & nbdkit.FLAG_REQ_ONE else found


@_translated
def cache(connection, count, offset, flags):
    connection.volume.cache(offset, count)
