"""`chunkvol mirror add|list|remove|status|sync|run|promote`: asynchronous mirrors."""

import ctypes
import ctypes.util
import json
import os
import signal
import sys
import threading
import time

from chunkvol import control, errors, tiering
from chunkvol.cli.common import pool_is_busy, pool_path, run_operation
from chunkvol.cli.progress import progress_bar
from chunkvol.cli.sizes import format_size, parse_size
from chunkvol.clock import node_index
from chunkvol.errors import AlreadyExistsError, ChunkvolError, NotFoundError, PoolBusyError, UsageError
from chunkvol.format import chunk_header, mirrors as mirrors_format
from chunkvol.mirror import config as mirror_config
from chunkvol.mirror import identity, rejoin
from chunkvol.mirror import shipper as shipping
from chunkvol.mirror.source import LogSource
from chunkvol.mirror.workers import MirrorWorker
from chunkvol.monitor.errors import ErrorCounts, kind_of, shipper_counts_path
from chunkvol.monitor.log import FORMATS, EventLog
from chunkvol.objstore.keys import load_key
from chunkvol.mirror import targets
from chunkvol.pool import Pool
from chunkvol.pool.metadata import drop_mirror_role
from chunkvol.storage.files import LocalFiles

POLL_SECONDS = 0.5
FOLLOW_SECONDS = 0.1  # how often a sync beside `serve` reads the mirror's state
TIERING_SECONDS = 1.0  # how often `mirror run` applies the tiering policy
STOP_SECONDS = 10.0    # a worker blocked on a dead link is not waited for longer at exit


def register(commands):
    mirror = commands.add_parser("mirror", help="asynchronous mirrors of this pool")
    actions = mirror.add_subparsers(dest="action", metavar="ACTION", parser_class=type(mirror))
    actions.required = True
    add = actions.add_parser("add", help="mirror this pool to a pool on another disk, another node or an object store")
    add.add_argument("name")
    add.add_argument("--to", required=True, help="dir:PATH (created if absent), node:HOST:PORT, "
                                                "rados:CEPH_CONF:RADOS_POOL or s3:URL/BUCKET")
    add.add_argument("--bandwidth", help="bytes per second at most, e.g. 16M (default: no limit)")
    add.add_argument("--key", metavar="PATH", help="object stores: encrypt and authenticate everything stored with "
                                                   "this key file (`chunkvol key generate PATH`)")
    add.set_defaults(run=mirror_add)
    listing = actions.add_parser("list", help="the mirrors of this pool")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=mirror_list)
    remove = actions.add_parser("remove", help="stop mirroring (the mirror's data stays where it is)")
    remove.add_argument("name")
    remove.set_defaults(run=mirror_remove)
    status = actions.add_parser("status", help="per mirror: state, how far behind, throughput, last error")
    status.add_argument("name", nargs="?")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=mirror_status)
    sync = actions.add_parser("sync", help="ship until the mirror has everything written so far")
    sync.add_argument("name")
    sync.set_defaults(run=mirror_sync)
    run = actions.add_parser("run", help="ship to every mirror continuously (what `serve` runs beside nbdkit)")
    run.add_argument("--via-server", action="store_true",
                     help="never open the pool here: learn the durable log end from its server only")
    run.add_argument("--log-format", choices=FORMATS, default="text",
                     help="text (default) or json: one JSON object per line (time, level, event, fields)")
    run.set_defaults(run=mirror_run)
    promote = actions.add_parser("promote", help="make this mirror a writable pool (its source is lost)")
    promote.set_defaults(run=mirror_promote)
    rejoin_parser = actions.add_parser("rejoin", help="a lost source comes back: become a mirror of the node "
                                                      "that was promoted, keeping what both share")
    rejoin_parser.add_argument("--from", dest="source", required=True, metavar="dir:PATH|node:HOST:PORT")
    rejoin_parser.set_defaults(run=mirror_rejoin)


def mirror_add(arguments):
    path, fields = pool_path(arguments)
    if fields.get("role") == "mirror":
        raise UsageError("this pool is itself a mirror; add mirrors on its source (or promote it first)")
    if not mirrors_format.NAME.match(arguments.name):
        raise UsageError(f"invalid mirror name {arguments.name!r}: letters, digits, '.', '_', '+', '-'")
    target = targets.normalize(arguments.to)
    bandwidth = parse_size(arguments.bandwidth) if arguments.bandwidth else None
    if bandwidth is not None and bandwidth < 4096:
        raise UsageError("--bandwidth must be at least 4K (bytes per second)")
    parsed = targets.parse_target(target)
    if parsed[0] == "dir" and os.path.realpath(parsed[1]) == os.path.realpath(path):
        raise UsageError("a pool cannot mirror to itself")
    mirrors = mirror_config.load_mirrors(path)
    if arguments.name in mirrors:
        raise AlreadyExistsError(f"mirror {arguments.name!r} exists already (to {mirrors[arguments.name]['to']})")
    for name, definition in mirrors.items():
        if definition["to"] == target:
            raise AlreadyExistsError(f"mirror {name!r} already goes to {target}")
    source = LogSource(path, fields, LocalFiles())
    try:
        first = source.chunks.ids()[0] if source.chunks.ids() else 1
    finally:
        source.close()
    if first != 1:
        raise UsageError(f"the log starts at chunk {first} (compaction freed the ones before): a new mirror "
                         "needs the whole log; mirroring a compacted pool is not supported yet")
    key = None
    if arguments.key:
        if parsed[0] not in ("rados", "s3"):
            raise UsageError("--key is for object-store mirrors (rados:, s3:): a dir: or node: mirror is yours")
        key = load_key(os.path.abspath(arguments.key))
    if parsed[0] == "node":
        identity.ensure_authority(path, fields)
    else:
        # Reach or create it now, so that a mistake (a key that does not fit) shows now.
        targets.open_target(target, fields, path, key=key).close()
    mirrors[arguments.name] = {"to": target, "bandwidth": bandwidth,
                               "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if key is not None:  # the path and fingerprint only: the key stays in its file
        mirrors[arguments.name].update(key=key.path, key_fingerprint=key.fingerprint)
    mirror_config.save_mirrors(path, mirrors)
    mirror_config.save_state(path, arguments.name,
                        mirror_config.mirror_state.initial(chunk_header.address(1, chunk_header.DATA_OFFSET)))
    print(f"mirror {arguments.name} -> {target}" + (f" at {format_size(bandwidth)}/s" if bandwidth else "")
          + (f", encrypted with the key {key.fingerprint}" if key is not None else "")
          + f"; a running `serve` ships to it now; `chunkvol --pool {arguments.pool} mirror sync "
          f"{arguments.name}` ships and waits")


def mirror_list(arguments):
    path, _ = pool_path(arguments)
    mirrors = mirror_config.load_mirrors(path)
    rows = [{"name": name, **definition, **encryption_of(definition)} for name, definition in sorted(mirrors.items())]
    if arguments.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no mirrors")
    for row in rows:
        limit = f"  bandwidth {format_size(row['bandwidth'])}/s" if row.get("bandwidth") else ""
        print(f"{row['name']}  -> {row['to']}{limit}  {encryption_text(row)}  (added {row['added']})")


def encryption_of(definition):
    """What list and status say of a mirror's encryption: whether, and the key's fingerprint
    (never the key, nor its path in status)."""
    return {"encrypted": bool(definition.get("key")), "key_fingerprint": definition.get("key_fingerprint")}


def encryption_text(row):
    return f"encrypted (key {row['key_fingerprint']})" if row["encrypted"] else "not encrypted"


def mirror_remove(arguments):
    path, _ = pool_path(arguments)
    mirrors = mirror_config.load_mirrors(path)
    if arguments.name not in mirrors:
        raise NotFoundError(f"no mirror {arguments.name!r}")
    target = mirrors[arguments.name]["to"]
    mirror_config.remove_mirror(path, mirrors, arguments.name)
    print(f"removed mirror {arguments.name} (its data at {target} is left as it is)")


class _Horizon:
    """How far this node's log is durable: from the server that holds the pool, or from the
    pool opened here (held, so nothing writes meanwhile)."""

    def __init__(self, path, flush=True, via_server=False):
        self.path = path
        self.pool = None
        self.flush = flush
        if not via_server and not pool_is_busy(path):
            try:
                self.pool = Pool.open(path)
            except PoolBusyError:
                self.pool = None

    def get(self):
        if self.pool is not None:
            if self.flush:
                self.pool.flush()
            with self.pool.lock:
                return self.pool.writer.durable_address, self.pool.next_sequence
        answer = control.call(self.path, "log_horizon")
        return answer["durable"], answer["next_sequence"]

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def mirror_status(arguments):
    path, fields = pool_path(arguments)
    mirrors = mirror_config.load_mirrors(path)
    names = [arguments.name] if arguments.name else sorted(mirrors)
    if arguments.name and arguments.name not in mirrors:
        raise NotFoundError(f"no mirror {arguments.name!r}")
    horizon = _Horizon(path)
    try:
        durable, next_sequence = horizon.get()
        rows = []
        for name in names:
            shipper = shipping.Shipper(path, fields, name, mirrors[name])
            try:
                rows.append(dict(shipper.status(durable, next_sequence), **encryption_of(mirrors[name])))
            finally:
                shipper.close()
    finally:
        horizon.close()
    if arguments.json:
        print(json.dumps(rows if not arguments.name else rows[0], indent=2))
        return
    if not rows:
        print("no mirrors")
    for row in rows:
        eta = "-" if row["eta_seconds"] is None else f"{row['eta_seconds']:.0f}s"
        print(f"{row['name']}  -> {row['to']}  {row['state']}  behind {row['records_behind']} records, "
              f"{format_size(row['bytes_behind'])}, {row['seconds_behind']:.1f}s  "
              f"{format_size(int(row['throughput_bytes_per_second']))}/s  eta {eta}  {encryption_text(row)}")
        if row["last_error"]:
            print(f"  last error: {row['last_error']}")


def mirror_sync(arguments):
    path, fields = pool_path(arguments)
    definition = mirror_config.definition_of(path, arguments.name)
    horizon = _Horizon(path)
    shipper = shipping.Shipper(path, fields, arguments.name, definition)
    try:
        durable, _ = horizon.get()
        total = shipper.source.distance(shipper.state["cursor"], durable)
        started = time.monotonic()
        with progress_bar(total, f"mirror {arguments.name}") as advance:
            if horizon.pool is None and mirror_config.shipper_running(path):  # `serve`'s shipper has it
                sent = _follow_served_shipper(path, arguments.name, shipper, durable, advance)
            else:
                sent = shipper.ship(durable, progress=advance)
        elapsed = time.monotonic() - started
    finally:
        shipper.close()
        horizon.close()
    rate = f" at {format_size(int(sent / elapsed))}/s" if sent and elapsed > 0 else ""
    print(f"mirror {arguments.name} has everything written up to now: {format_size(sent)} shipped"
          f"{rate} in {elapsed:.1f}s")


def _follow_served_shipper(path, name, shipper, durable, advance):
    """While `serve` runs, its shipper (`mirror run`) ships every mirror; a second shipper
    beside it would fight it for the target (a dir: mirror's pool is locked by it). So wait
    until the mirror's durable cursor reaches `durable`, advancing the progress bar from the
    mirror's state file; a failure the shipper records meanwhile is this sync's failure, raised
    as the error it was. Returns the bytes shipped meanwhile."""
    began, first = time.time(), shipper.state
    cursor = first["cursor"]
    while True:
        state = mirror_config.load_state(path, name, first["cursor"])
        if state["cursor"] != cursor:
            advance(max(0, shipper.source.distance(cursor, min(state["cursor"], durable))))
            cursor = state["cursor"]
        if cursor >= durable:
            return state["shipped_bytes"] - first["shipped_bytes"]
        if state["state"] == "error" and state["updated"] >= began:
            kind = getattr(errors, state.get("last_error_kind") or "", None)
            kind = kind if isinstance(kind, type) and issubclass(kind, ChunkvolError) else ChunkvolError
            raise kind(f"mirror {name} ({shipper.definition['to']}), shipped by the server: "
                       f"{state['last_error']}")
        time.sleep(FOLLOW_SECONDS)


def mirror_run(arguments):
    """Ship to every mirror until SIGTERM: picks up `mirror add/remove` while it runs; each
    mirror ships in its own thread (mirror/workers.py), retried with backoff when it fails,
    so none holds up the others; the tiering policy runs in a thread of its own too."""
    path, fields = pool_path(arguments)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if arguments.via_server:
        _die_with_parent()
    shipper_lock = mirror_config.hold_shipper(path)  # `mirror sync` follows this process meanwhile
    log = EventLog(arguments.log_format)
    # `serve --http` reads these (monitor/errors.py); only serve's shipper (--via-server) publishes them.
    failures = ErrorCounts(shipper_counts_path(path) if arguments.via_server else None)
    workers = {}
    horizon = None
    last_complaint = None
    tiering_thread = threading.Thread(target=_tiering_loop, args=(path, fields, stop, log, failures), name="tiering",
                                      daemon=True)
    tiering_thread.start()
    try:
        while not stop.is_set():
            mirrors = mirror_config.load_mirrors(path)
            for name in list(workers):
                if mirrors.get(name) != workers[name].definition:
                    old = workers.pop(name)
                    old.stop()
                    old.join(STOP_SECONDS)  # a new definition of the name must not ship beside it
            for name, definition in mirrors.items():
                if name not in workers:
                    workers[name] = MirrorWorker(path, fields, name, definition, log.event,
                                                 failed=lambda error, to=definition["to"]: failures.count(
                                                     kind_of(error, to)))
            for worker in workers.values():
                if worker.crashed is not None:
                    raise worker.crashed
            if not workers:
                stop.wait(POLL_SECONDS)
                continue
            try:
                if horizon is None:
                    horizon = _Horizon(path, via_server=arguments.via_server)
                durable, _ = horizon.get()
            except (ChunkvolError, OSError) as error:
                if str(error) != last_complaint:  # e.g. the server is still starting: say it once
                    log.event("warning", "horizon.unknown", f"cannot learn how far the log is durable: {error}",
                              error=str(error))
                    last_complaint = str(error)
                stop.wait(POLL_SECONDS * 2)
                continue
            for worker in workers.values():
                worker.offer(durable)
            stop.wait(POLL_SECONDS)
    finally:
        stop.set()
        for worker in workers.values():
            worker.stop()
        deadline = time.monotonic() + STOP_SECONDS
        for worker in list(workers.values()) + [tiering_thread]:
            worker.join(max(0.0, deadline - time.monotonic()))
        if horizon is not None:
            horizon.close()
        os.close(shipper_lock)


def _tiering_loop(path, fields, stop, log, failures):
    """The tiering policy (`chunk policy`), every TIERING_SECONDS: a failure is said once
    (until it changes) and tried again the next time; shipping never waits on it."""
    last = None
    while not stop.wait(TIERING_SECONDS):
        try:
            for result in tiering.apply_policy(path, fields, lambda chunk_id: run_operation(
                    path, "chunk_switch", chunk_id=chunk_id)):
                log.event("info", "tiering.evicted", f"tiering: chunk {result['chunk']} evicted to {result['store']}",
                          chunk=result["chunk"], store=result["store"])
            last = None
        except (ChunkvolError, OSError) as error:
            failures.count("corruption" if isinstance(error, errors.CorruptionError) else "store")
            if str(error) != last:
                log.event("error", "tiering.failed", f"tiering: {error}", error=str(error))
                last = str(error)


def _die_with_parent():
    """Started by `serve`: a kill -9 of serve must not leave this holding a mirror's lock."""
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def mirror_promote(arguments):
    path, fields = pool_path(arguments)
    if fields.get("role") != "mirror":
        raise UsageError("this pool is not a mirror")
    if pool_is_busy(path):
        raise PoolBusyError("the mirror is open for writing (a shipper or a server holds it); stop it first")
    with Pool.open(path, readonly=True) as pool:
        holders = {pool.fields["mirror_of"], *pool.origins}
    clash = sorted(node for node in holders if node_index(node) == node_index(fields["node_id"]))
    if clash:
        raise UsageError(f"this mirror's node index ({node_index(fields['node_id'])}) is node {clash[0]}'s, whose "
                         "records it holds: promoted, its writes and that node's would carry the same stamps. "
                         "Make a new mirror (`mirror add` on the source picks a free index) and promote that")
    drop_mirror_role(path, fields, LocalFiles())
    print(f"{path} is now a writable pool (node {fields['node_id']}, was a mirror of node {fields['mirror_of']})")


def mirror_rejoin(arguments):
    path, _ = pool_path(arguments)
    report = rejoin.rejoin(path, targets.normalize(arguments.source))
    if report["divergent_file"]:
        print(f"saved {format_size(report['divergent_bytes'])} written here after what node "
              f"{report['promoted_node']} has (through sequence {report['shared_through_sequence']}) to "
              f"{report['divergent_file']}, and cut it from the log")
    print(f"{path} is now a mirror of node {report['promoted_node']}: add it as a mirror there "
          "(`chunkvol mirror add`) and it catches up from what both share")
