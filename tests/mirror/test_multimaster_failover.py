"""Failover of a single-primary volume between the two nodes of a pool, with ext4 on it, as a
user runs it: two `chunkvol serve --listen` sessions on one machine, paired with `peer add`,
the filesystem reached through nbdfuse + a loop device (this machine has no nbd module).

test_ext4_failover_to_the_other_node:

1. Node A writes ext4 on the single-primary volume `fs` (two trees of files, each followed by
   `sync -f`); after each sync we wait until B holds every record A has written (`peer status
   --json` on B, incoming.records_held, against A's `status --json` log.next_sequence).
2. More files are copied in and a `sync -f` is started; once A's log has grown by a few MiB
   (part of it shipped to B), A's shipper is stopped (SIGSTOP: the link to B is cut) and the
   writes go on for a while, then the whole serve session of A is killed with SIGKILL. A now
   holds a durable tail that B never received, as after a real loss of the primary.
3. On B: `volume promote fs`; the volume is mounted through B's export (ext4 replays its
   journal), the synced trees are there byte for byte, the unsynced files hold nothing that
   was not written; B writes a tree of its own; `e2fsck -fn` is clean.
4. A is served again: it catches up from B without a full copy (what B ships is about what B
   wrote; A's chunk files grow by about that much, not by the volume), serves `fs` read-only
   with B as its primary, and its content equals B's. A's tail is left out (DRBD's rule): what
   B serves does not change when A comes back, and is still a clean ext4 with every tree.

test_old_primary_tail_stays_out_of_the_promoted_volume: the same failover on a raw volume, to
pin down what happens to A's tail (durable on A, never shipped): when A comes back it must not
change what B, the promoted primary, serves, on either node, and `conflicts` names it. (Before
commit 770c4d1, A shipped the tail and B merged it by last writer wins, silently.)

Every process, mount, loop device and FUSE mount is removed also when the test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import nbd
import pytest

from tests.support.mirrors import Serve
from tests.support.server import CHUNKVOL, ENVIRONMENT, chunkvol
from tests.support.unsynced import check_maybe_lost as _check_maybe_lost
from tools.guest import fs
from tools.guest.nbdfuse import attached

MiB = 1 << 20
VOLUME = "fs"
VOLUME_BYTES = 256 * MiB
CUT_AFTER_BYTES = 4 * MiB  # A's shipper is stopped once the last sync has written this much
TAIL_BYTES = 3 * MiB  # then A's log grows by at least this much before A is killed

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"),
    reason="needs root, /dev/fuse and loop devices (nbdfuse + losetup + mount)")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Node(Serve):
    """One node: `chunkvol --pool POOL serve --socket SOCK --listen 127.0.0.1:PORT` in a session
    of its own (tests.support.mirrors.Serve: kill() is a SIGKILL of that whole process group)."""

    def __init__(self, workdir: Path, name: str):
        super().__init__(str(workdir / name), str(workdir / f"{name}.sock"), str(workdir / f"{name}.log"))
        self.name = name
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"

    def cv(self, *arguments, check=True):
        return chunkvol("--pool", self.pool, *arguments, check=check)

    def json(self, *arguments):
        return json.loads(self.cv(*arguments, "--json").stdout)

    def start(self):
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [CHUNKVOL, "--pool", self.pool, "serve", "--socket", self.socket_path, "--listen", self.address],
            stdout=log, stderr=log, env=ENVIRONMENT, start_new_session=True)
        log.close()
        _wait_for(self._serving, f"node {self.name} to serve", timeout=60, alive=self._alive)
        return self

    def _alive(self):
        if self.process.poll() is not None:
            return f"serve of {self.name} exited {self.process.returncode}: {self.log()}"
        return None

    def _serving(self):
        try:
            handle = nbd.NBD()
            handle.set_opt_mode(True)
            handle.connect_unix(self.socket_path)
            handle.opt_abort()
        except nbd.Error:
            return False
        return self._listening()

    def _listening(self):
        """The replication port is in LISTEN state (read from /proc, not probed: a probe is
        logged by the node as a refused TLS handshake)."""
        wanted = f"0100007F:{self.port:04X}"
        with open("/proc/net/tcp") as handle:
            return any(line.split()[1] == wanted and line.split()[3] == "0A" for line in list(handle)[1:])

    def log(self):
        with open(self.log_path, errors="replace") as handle:
            return handle.read()[-3000:]

    def shipper_pids(self):
        """The serve session's `mirror run --via-server` process (the shipper)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
                if os.getpgid(int(entry)) == self.process.pid and b"mirror" in argv and b"run" in argv:
                    found.append(int(entry))
            except OSError:
                continue
        return found

    def peer(self):
        rows = self.json("peer", "status")["peers"]
        assert len(rows) == 1, rows
        return rows[0]

    def log_bytes(self):
        """Bytes written into the chunk files (their apparent size)."""
        return sum(path.stat().st_size for path in (Path(self.pool) / "chunks").glob("*"))

    def volume_row(self):
        return next(row for row in self.json("volume", "list") if row["name"] == VOLUME)


def _wait_for(predicate, what, timeout=90, interval=0.1, alive=None):
    """Poll; the timeout only stops a hang, it asserts nothing about speed."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and (problem := alive()):
            raise AssertionError(problem)
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)


def _holds_everything(receiver: Node, sender: Node, timeout=90):
    """Wait until RECEIVER holds every record SENDER has written so far: SENDER's last
    sequence (`status --json`, read beside its server) against the greatest of SENDER's
    sequences that RECEIVER holds (`peer status --json`, incoming). The shipper's own
    `records_behind` is not used: the heartbeat flush point each second makes it flicker
    between 0 and 1, and a poll every ~1 s can keep seeing 1."""
    last = sender.json("status")["log"]["next_sequence"] - 1
    found = {}

    def done():
        found["row"] = row = receiver.peer()
        return row["connected"] and row["incoming"]["records_held"] >= last

    _wait_for(done, f"{receiver.name} to hold {sender.name}'s records up to {last} ({found.get('row')})",
              timeout=timeout, interval=0.2)
    return found["row"]


def _sync(mountpoint: Path):
    subprocess.run(["sync", "--file-system", str(mountpoint)], check=True, capture_output=True)


def _volume_digest(node: Node) -> str:
    """SHA-256 of the whole volume as NODE's export serves it."""
    handle = nbd.NBD()
    handle.connect_uri(f"nbd+unix:///{VOLUME}?socket={node.socket_path}")
    try:
        digest = hashlib.sha256()
        for offset in range(0, handle.get_size(), 8 * MiB):
            digest.update(handle.pread(8 * MiB, offset))
        return digest.hexdigest()
    finally:
        handle.shutdown()


def _export_read_only(node: Node) -> bool:
    handle = nbd.NBD()
    handle.connect_uri(f"nbd+unix:///{VOLUME}?socket={node.socket_path}")
    try:
        return handle.is_read_only()
    finally:
        handle.shutdown()


def _pair(a, b, tmp_path):
    """A founds the pool, B joins it, both serve, and each is the other's peer."""
    a.cv("init", "--chunk-size", "16M")
    a.cv("join-file", str(tmp_path / "b.join"))
    b.cv("init", "--join", str(tmp_path / "b.join"))
    a.start()
    b.start()
    a.cv("peer", "add", "b", "--address", b.address)
    b.cv("peer", "add", "a", "--address", a.address)


@contextlib.contextmanager
def _stopped(pids):
    """SIGSTOP the processes for the `with` block (SIGCONT after, if they still live)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_ext4_failover_to_the_other_node(tmp_path):
    started = time.monotonic()
    report = []

    def note(text):
        report.append(f"{time.monotonic() - started:6.1f}s {text}")

    a, b = Node(tmp_path, "A"), Node(tmp_path, "B")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    try:
        _pair(a, b, tmp_path)
        note("serving, paired")
        a.cv("volume", "create", VOLUME, "--size", "256M")
        assert a.volume_row()["mode"] == "single-primary"
        _holds_everything(b, a)
        assert b.volume_row()["primary"] == a.volume_row()["primary"]
        assert _export_read_only(b) and not _export_read_only(a)
        note("two nodes serving, fs single-primary on A")

        # ---- 1. ext4 on A; synced trees reach B --------------------------------------------
        synced = ["synced-1", "synced-2"]
        with attached(a.socket_path, VOLUME, tmp_path) as dev:
            fs.mkfs(dev, "ext4", block_size=4096)
            fs.mount(dev, mnt)
            for seed, name in enumerate(synced, 1):
                fs.make_sample_tree(src / name, seed=seed, files=20, max_file_size=2 * MiB)
                fs.copy_tree(src / name, mnt / name)
                _sync(mnt)
                note(f"{name}: copied and synced")
                _holds_everything(b, a)
                note(f"{name}: synced, B holds everything")

            # ---- 2. more writes; the link breaks; A dies -------------------------------------
            size = fs.make_sample_tree(src / "unsynced", seed=3, files=30, max_file_size=3 * MiB)
            fs.copy_tree(src / "unsynced", mnt / "unsynced")  # into the page cache
            before = a.log_bytes()
            sync = subprocess.Popen(["sync", "--file-system", str(mnt)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                _wait_for(lambda: sync.poll() is not None or a.log_bytes() >= before + CUT_AFTER_BYTES,
                          "A's log to grow during the sync", interval=0.005)
                shippers = a.shipper_pids()
                assert shippers, "no shipper in A's serve session"
                with _stopped(shippers):
                    cut = a.log_bytes()
                    _wait_for(lambda: sync.poll() is not None or a.log_bytes() >= cut + TAIL_BYTES,
                              "A's log to grow with the shipper stopped")
                    if sync.poll() is not None:  # all written already: a little more for the tail
                        (mnt / "after-cut.bin").write_bytes(os.urandom(TAIL_BYTES))
                        _sync(mnt)
                    a.kill()
                note(f"A killed (log +{cut - before} bytes before the cut, "
                     f"+{a.log_bytes() - cut} after it, of {size} bytes copied)")
            finally:
                sync.wait(timeout=120)  # returns (with EIO) once the server is gone
            tail_bytes = a.log_bytes() - cut
        # attached() has torn down A's mount, loop device and nbdfuse

        # ---- 3. B takes over -----------------------------------------------------------------
        b.cv("volume", "promote", VOLUME)
        assert b.volume_row()["primary"] == b.json("peer", "status")["node"]
        assert not _export_read_only(b)
        b_log_at_promote = b.log_bytes()
        b_shipped_at_promote = b.json("mirror", "status", "a")["shipped_bytes"]
        with attached(b.socket_path, VOLUME, tmp_path) as dev:
            header = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True).stdout
            assert "needs_recovery" in header, "B's copy of ext4 should be as A left it: mounted, journal to replay"
            with fs.mounted(dev, mnt):  # replays the journal
                for name in synced:
                    assert fs.compare_trees(src / name, mnt / name) == [], f"{name} on B\n" + "\n".join(report)
                assert _check_maybe_lost(src / "unsynced", mnt / "unsynced") == []
                present = len(list((mnt / "unsynced").rglob("*.bin"))) if (mnt / "unsynced").exists() else 0
                fs.make_sample_tree(src / "on-b", seed=4, files=10, max_file_size=2 * MiB)
                fs.copy_tree(src / "on-b", mnt / "on-b")
                _sync(mnt)
            check = fs.fsck(dev, "ext4")
            assert check.clean, f"B after failover: {check}\n" + "\n".join(report)
        note(f"B promoted, journal replayed, {present} of 30 unsynced files present, fsck clean")
        b_written = b.log_bytes() - b_log_at_promote
        digest_b = _volume_digest(b)

        # ---- 4. A comes back -----------------------------------------------------------------
        a_log_before = a.log_bytes()
        a.start()
        note("A serving again")
        _wait_for(lambda: a.volume_row()["primary"] == b.volume_row()["primary"],
                  "A to learn that B is the primary", timeout=90)
        _holds_everything(a, b)
        _holds_everything(b, a)
        note("caught up both ways")
        shipped = b.json("mirror", "status", "a")["shipped_bytes"] - b_shipped_at_promote
        grown = a.log_bytes() - a_log_before
        figures = {"b_written_bytes": b_written, "b_shipped_to_a_bytes": shipped, "a_pool_growth_bytes": grown,
                   "a_tail_bytes": tail_bytes, "volume_bytes": VOLUME_BYTES}
        note(f"figures {figures}")
        assert 0 < shipped <= 1.2 * b_written + MiB, figures  # B's own new records only
        assert 0.9 * shipped <= grown <= 1.2 * shipped + 2 * MiB, figures  # about what B wrote: no full copy
        assert _export_read_only(a), "A must serve fs read-only now: B is its primary"
        digest_a = _volume_digest(a)
        assert digest_a == _volume_digest(b), "A's fs differs from B's after catching up\n" + "\n".join(report)

        # A's tail (durable on A, never received by B before B took over) is left out: what B
        # serves has not changed under B's filesystem, which is still clean with every tree.
        assert _volume_digest(b) == digest_b, f"B's volume changed when A came back (A's tail: {tail_bytes} bytes)"
        with attached(b.socket_path, VOLUME, tmp_path, readonly=True) as dev:
            check = fs.fsck(dev, "ext4")
            assert check.clean, f"B after A came back: {check}\n" + "\n".join(report)
            with fs.mounted(dev, mnt, options="ro,noload"):
                for name in synced + ["on-b"]:
                    assert fs.compare_trees(src / name, mnt / name) == [], f"{name} on B after A came back"
        note("A read-only and equal to B; B unchanged by A's return, fsck clean, trees intact")
    finally:
        for node in (a, b):
            with contextlib.suppress(Exception):
                node.kill()
        for line in report:
            print(line)


def test_old_primary_tail_stays_out_of_the_promoted_volume(tmp_path):
    """A single-primary volume: A (the primary) makes a write durable that B never receives
    (A's shipper is stopped, as when the link drops), then A is lost. B is promoted and writes.
    When A comes back, the volume B serves must not change under B's clients: A's lone write
    was made before the promotion and B's filesystem has moved on without it (DRBD discards
    such writes; `mirror rejoin` saves them to divergent-*.cvlog and cuts them). A follows B."""
    a, b = Node(tmp_path, "A"), Node(tmp_path, "B")

    def handle(node):
        connection = nbd.NBD()
        connection.connect_uri(f"nbd+unix:///v?socket={node.socket_path}")
        return connection

    try:
        _pair(a, b, tmp_path)
        a.cv("volume", "create", "v", "--size", "16M")
        connection = handle(a)
        connection.pwrite(b"a" * MiB, 0)
        connection.flush()
        connection.shutdown()
        _holds_everything(b, a)
        shippers = a.shipper_pids()
        assert shippers, "no shipper in A's serve session"
        with _stopped(shippers):
            connection = handle(a)
            connection.pwrite(b"T" * MiB, 4 * MiB)  # A's tail: durable on A only
            connection.flush()
            connection.shutdown()
            a.kill()
        b.cv("volume", "promote", "v")
        connection = handle(b)
        assert connection.pread(MiB, 4 * MiB) == bytes(MiB)
        connection.pwrite(b"b" * MiB, 8 * MiB)
        connection.flush()
        connection.shutdown()

        a.start()
        node_b = b.json("peer", "status")["node"]
        _wait_for(lambda: next(row for row in a.json("volume", "list") if row["name"] == "v")["primary"] == node_b,
                  "A to learn that B is the primary")
        _holds_everything(a, b)
        _holds_everything(b, a)
        status = b.json("peer", "status")
        left_out = b.json("conflicts", "v")["left_out"]
        assert [event["node"] for event in left_out] == [a.json("status")["node_id"]], left_out
        for node in (b, a):
            connection = handle(node)
            try:
                assert connection.pread(MiB, 8 * MiB) == b"b" * MiB
                assert connection.pread(MiB, 4 * MiB) == bytes(MiB), (
                    f"node {node.name} serves A's pre-failover tail (1 MiB of 'T' at 4 MiB) in v after A came back; "
                    f"B reports split_brain={status['split_brain']} conflicts={status['conflicts']}")
            finally:
                connection.shutdown()
    finally:
        for node in (a, b):
            with contextlib.suppress(Exception):
                node.kill()
