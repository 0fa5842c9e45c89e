"""kill -9 of a real nbdkit server running chunkvol (reliability.md A1, A4).

A seeded workload (tools/workload.py) writes through libnbd while the server is killed with
SIGKILL at seeded moments; the server is restarted on the same pool and the volume is checked
against the workload's journal after every restart: every op acknowledged before the last
acknowledged flush is there, and the volume is the state after a prefix of the ops (in
acknowledgement order, then the in-flight one), whole requests only (no torn writes).

Also: kill -9 while the pool is being opened (log replay, tail cut, the checkpoint that ends
recovery), and while the block map is being checkpointed under load.

CHUNKVOL_KILL_CYCLES=N runs N kill cycles per seed instead of the default.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import nbd
import pytest

from chunkvol.pool import journal
from tests.support.faults import make_pool
from tests.support.paths import TOOLS
from tests.support.server import ENVIRONMENT, PLUGIN, NbdServer

sys.path.insert(0, TOOLS)
from workload import (History, NbdTarget, Oracle, Params, Workload, run,  # noqa: E402
                      run_pipelined)

MiB = 1 << 20
CYCLES = int(os.environ.get("CHUNKVOL_KILL_CYCLES") or 12)


class KillableServer(NbdServer):
    """NbdServer that can also be started without waiting (to kill it while it opens the
    pool) and with nbdkit options (--threads 1: a connection's requests run in order, which
    pipelined prefix checks need)."""

    def __init__(self, pool, socket_path, *keys, threads=None):
        super().__init__(pool, socket_path, *keys)
        self.options = ["--threads", str(threads)] if threads else []

    def spawn(self):
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            ["/usr/bin/nbdkit", "-f", *self.options, "-U", self.socket_path, "python", PLUGIN,
             f"pool={self.pool}", *self.keys],
            stdout=log, stderr=log, env=ENVIRONMENT, start_new_session=True)
        log.close()
        return self

    def ready(self):
        if self.process is None or self.process.poll() is not None or not os.path.exists(self.socket_path):
            return False
        try:
            handle = self.connect(None)
            handle.opt_abort()
            return True
        except nbd.Error:
            return False

    def start(self, timeout_seconds=60):
        self.spawn()
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nbdkit exited with {self.process.returncode}: {self.log()}")
            if self.ready():
                return self
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"nbdkit did not start: {self.log()}")


@pytest.fixture
def servers(tmp_path):
    made = []

    def make(pool, *keys, threads=None):
        server = KillableServer(pool, str(tmp_path / f"k{len(made)}.sock"), *keys, threads=threads)
        made.append(server)
        return server

    yield make
    for server in made:
        server.kill()


def _verify(server, history, oracle, where, **options):
    handle = server.connect()
    try:
        result = oracle.verify(history, NbdTarget(handle).read, atomicity="request", **options)
    finally:
        handle.shutdown()
    assert result.ok, f"{where}: {result.problems}\nserver log: {server.log()[-1500:]}"
    history.rebase(result)
    return result


def _journal_matches(history):
    """The journal on disk says what the History in memory says."""
    loaded = History.load(history.journal_path)
    try:
        assert (loaded.entries, loaded.flushed, loaded.inflight) == \
            (history.entries, history.flushed, history.inflight)
    finally:
        loaded.close()


class SpreadTarget(NbdTarget):
    """Each op on one of several connections to the same export, chosen by op index: the
    server says can_multi_conn, so a flush on any connection covers writes acknowledged on
    all of them (the oracle's flush rule needs nothing else)."""

    def __init__(self, handles):
        super().__init__(handles[0])
        self.handles = handles

    def apply(self, workload, op):
        self.handle = self.handles[random.Random(f"conn:{op.index}").randrange(len(self.handles))]
        super().apply(workload, op)


@pytest.mark.parametrize("seed,compression,connections,cache", [
    (1, "none", 1, "writeback"), (2, "zstd", 1, "writeback"), (3, "none", 1, "none"), (4, "zstd", 3, "writeback"),
    (5, "zstd", 2, "none")])
def test_kill9_under_load_keeps_flushed_writes_and_a_prefix(seed, compression, connections, cache, tmp_path,
                                                            server_factory):
    """CYCLES x: write (random sizes, unaligned, multi-group, big, zero, trim, FUA, flush)
    -> SIGKILL at a seeded moment -> restart -> verify -> go on from the recovered state.
    With several connections, each op goes to one of them (flushes too). cache=none: the
    log is written with O_DIRECT (the pool's setting), partial last pages rewritten."""
    rng = random.Random(f"kill9:{seed}")
    pool = make_pool(str(tmp_path / "pool"), volume_size=64 * MiB, compression=compression, cache=cache)
    params = Params(volume_size=64 * MiB, span=8 * MiB).with_weights(big=6)
    history = History(Workload(seed, params), str(tmp_path / "journal"))
    oracle = Oracle(history.workload)
    server = server_factory(pool)
    figures = {"seed": seed, "connections": connections, "kill_points": 0, "torn_requests": 0, "ops_acknowledged": 0,
               "flushed_op_checks": 0, "acked_ops_lost": 0, "inflight_applied": 0,
               "exact_after_flush_checks": 0}
    for cycle in range(CYCLES):
        handles = [server.connect() for _ in range(connections)]
        assert connections == 1 or handles[0].can_multi_conn()
        stop = threading.Event()
        failure = []

        def work():
            try:
                run(history, SpreadTarget(handles), 10 ** 9, stop=stop)
            except nbd.Error as error:
                if not stop.is_set():
                    failure.append(error)

        worker = threading.Thread(target=work)
        acked_before = len(history.entries)
        worker.start()
        time.sleep(rng.uniform(0.02, 0.6))
        stop.set()
        served = None
        if rng.random() < 0.25:
            # Kill right after a flush: the restart must show exactly what was served then.
            worker.join(timeout=60)
            handles[0].flush()
            served = NbdTarget(handles[0]).read(0, params.region)
        server.kill(signal.SIGKILL)
        worker.join(timeout=60)
        assert not worker.is_alive()
        assert not failure, f"cycle {cycle}: an op failed before the kill: {failure}"
        handles = None  # libnbd closes the handles when they are collected
        figures["kill_points"] += 1
        figures["ops_acknowledged"] += len(history.entries) - acked_before
        _journal_matches(history)
        server.start()
        flushed, acked = history.flushed, len(history.entries)
        result = _verify(server, history, oracle, f"seed {seed} cycle {cycle}")
        if served is not None:
            handle = server.connect()
            assert NbdTarget(handle).read(0, params.region) == served, \
                f"seed {seed} cycle {cycle}: after kill -9 the volume differs from what was served at the flush"
            handle.shutdown()
            figures["exact_after_flush_checks"] += 1
        figures["flushed_op_checks"] += flushed
        figures["acked_ops_lost"] += max(0, acked - result.prefix)
        figures["inflight_applied"] += max(0, result.prefix - acked)
        figures["torn_requests"] += result.torn is not None
        _journal_matches(history)
    print(json.dumps({"test": "kill9_under_load", **figures}))


def _pool_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _time_to_ready(servers, pool, copy):
    """How long opening this pool takes, measured on a copy (the copy's open changes it)."""
    shutil.copytree(pool, copy, ignore=shutil.ignore_patterns("lock"))
    server = servers(copy)
    started = time.monotonic()
    server.start()
    elapsed = time.monotonic() - started
    server.kill()
    shutil.rmtree(copy)
    return elapsed


def _index_stamp(pool):
    try:
        status = os.stat(os.path.join(pool, "index", "data.mdb"))
        return status.st_mtime_ns, status.st_size
    except FileNotFoundError:
        return None


def _checkpoint_address(pool):
    """The log address in the block map's committed checkpoint (None: none)."""
    from chunkvol.index.blockmap import BlockMap
    if _index_stamp(pool) is None:
        return None
    stored = BlockMap(os.path.join(pool, "index"), readonly=True)
    try:
        checkpoint = stored.read_checkpoint()
        return None if checkpoint is None else checkpoint.log_address
    finally:
        stored.close()


def test_kill9_while_opening_the_pool(tmp_path, servers):
    """A long unreplayed log tail, then SIGKILL of the server again and again while it
    replays the tail, cuts it and checkpoints the result; finally it must come up with
    every flushed op and a prefix."""
    rng = random.Random("kill9:open")
    pool = make_pool(str(tmp_path / "pool"), volume_size=256 * MiB, compression="zstd")
    params = Params(volume_size=256 * MiB, span=256 * MiB, pattern="stride", flush_every=3000,
                    compressible=0.8)
    history = History(Workload(11, params), str(tmp_path / "journal"))
    oracle = Oracle(history.workload)
    server = servers(pool, threads=1).start()
    handle = server.connect()
    run_pipelined(history, handle, 31234)  # the last 1234 ops are not flushed
    handle = None  # libnbd closes the handle when it is collected
    server.kill(signal.SIGKILL)  # the tail since the open's checkpoint is unreplayed
    open_seconds = _time_to_ready(servers, pool, str(tmp_path / "copy"))
    # First, killed the moment the block map file changes: the checkpoint that ends recovery
    # (or one during a long replay) is being written. If the kill comes after LMDB's commit,
    # later attempts find nothing to replay; stop watching once the server is ready.
    stamp = _index_stamp(pool)
    server.spawn()
    deadline = time.monotonic() + 60
    next_probe = time.monotonic() + 0.05
    while _index_stamp(pool) == stamp and server.process.poll() is None and time.monotonic() < deadline:
        if time.monotonic() >= next_probe:
            if server.ready():
                break
            next_probe = time.monotonic() + 0.05
    server.kill(signal.SIGKILL)
    caught_checkpoint = _index_stamp(pool) != stamp
    attempts = []
    fractions = sorted(rng.uniform(0.05, 1.0) for _ in range(6))
    for fraction in fractions:
        server.spawn()
        time.sleep(open_seconds * fraction)
        server.kill(signal.SIGKILL)
        attempts.append(round(open_seconds * fraction, 3))
    server.start()
    result = _verify(server, history, oracle, "after kills during open", check_span=False, sample=3000,
                     rng=random.Random(1))
    print(json.dumps({"test": "kill9_while_opening", "open_seconds": round(open_seconds, 3),
                      "kill_delays_s": attempts, "killed_at_index_write": caught_checkpoint,
                      "kill_points": len(attempts) + 1, "ops_acknowledged": len(history.entries),
                      "blocks_checked": result.blocks_checked, "pool_bytes": _pool_size(pool)}))


def test_kill9_during_block_map_checkpoint(tmp_path, servers):
    """Enough distinct map groups change without a client flush that the pool makes a flush
    point and a block-map checkpoint of its own (one large LMDB transaction, pool.py
    AUTO_FLUSH_GROUPS); SIGKILL as soon as the index file changes, twice."""
    volume = 4 << 30
    pool = make_pool(str(tmp_path / "pool"), volume_size=volume, compression="zstd")
    # Every op dirties a new map group. The pool flushes and checkpoints on its own once
    # AUTO_FLUSH_GROUPS groups are dirty; client flushes come a little less often, so the first
    # kill comes before any client flush and the second after one (durability is tested too).
    auto_flush = journal.AUTO_FLUSH_GROUPS
    params = Params(volume_size=volume, span=volume, pattern="stride", flush_every=auto_flush + 1000,
                    compressible=1.0)
    history = History(Workload(21, params), str(tmp_path / "journal"))
    oracle = Oracle(history.workload)
    server = servers(pool, threads=1).start()
    caught = []
    committed = []
    for round_number in range(2):
        stamp = _index_stamp(pool)
        address = _checkpoint_address(pool)
        killed = threading.Event()

        def watch():
            while not killed.is_set():
                if _index_stamp(pool) != stamp:
                    server.kill(signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.0002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        handle = server.connect()
        try:
            run_pipelined(history, handle, 150000)
        except (nbd.Error, RuntimeError):
            pass
        finally:
            killed.set()
            watcher.join()
        handle = None  # libnbd closes the handle when it is collected
        assert server.process is None, "no checkpoint happened: the index never changed"
        caught.append(len(history.entries))
        committed.append(_checkpoint_address(pool) != address)
        server.start()
        _verify(server, history, oracle, f"checkpoint kill {round_number}", check_span=False,
                sample=2000, rng=random.Random(round_number))
    print(json.dumps({"test": "kill9_during_checkpoint", "kill_points": len(caught),
                      "acked_ops_at_kills": caught, "flushed_ops": history.flushed,
                      "checkpoint_committed_before_kill": committed}))
