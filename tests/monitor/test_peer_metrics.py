"""The peer metrics of `serve --http` (issue 18) on two real nodes of one pool, each served as
a user runs them (`chunkvol serve --socket --listen --http`, on loopback), written through
real NBD clients (libnbd) and scraped with prometheus_client's parser:

- chunkvol_peer_behind_bytes{peer, direction}: "out" as `peer status --json` reports this
  node's shipper to the peer, "in" as the peer reports its shipper to this node (sampled);
- chunkvol_conflicts_total{volume} after both nodes wrote one block while apart;
- chunkvol_errors_total{kind="peer"} while the peer cannot be reached.

A link is made slow with `peer add --bandwidth` (so the lag is there as long as the test
wants it) and cut with iptables (REJECT with a TCP reset on the peer's listener: the shipper
fails at once, as against a peer whose server is down, instead of after its dead-link
timeout). Every rule is removed and every node's serve session killed by its process group
id, also on failure. Nothing here waits a fixed time for something to happen: each figure is
polled for, with a deadline.
"""

import contextlib
import os
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from chunkvol.mirror import config as mirror_config
from chunkvol.monitor import figures as monitor_figures
from chunkvol.monitor.errors import read_counts, shipper_counts_path
from chunkvol.monitor.figures import PoolFigures
from tests.mirror.test_multimaster_nodes import Node, wait_converged, wait_for_volume
from tests.monitor.test_monitoring import Served
from tests.support.nodes import free_port
from tests.support.server import ENVIRONMENT

MiB = 1 << 20
BLOCK = 4096
VOLUME = "mm"
SLOW = "4K"  # bytes per second: after a 1 MiB batch the next one waits 256 s
# The "in" direction is sampled every monitor/sampler.py SAMPLE_SECONDS (10 s): a few samples.
SAMPLED_SECONDS = 45
DEADLINE_SECONDS = 30
HEARTBEAT_SPAN = 1.5  # seconds: over a heartbeat's period (chunkvol/pool/journal.py, 1 s)

needs_iptables = pytest.mark.skipif(os.geteuid() != 0, reason="cutting a link takes iptables (root)")


class MonitoredNode(Node):
    """A node as tests/mirror/test_multimaster_nodes.py runs one (`serve --socket --listen`,
    in a session of its own, killed by its process group), with `--http` on a port of its
    own too, and Served's scraping of /metrics."""

    get = Served.get
    metrics = Served.metrics

    def __init__(self, tmp_path, name):
        super().__init__(tmp_path, name, f"127.0.0.1:{free_port()}")
        self.port = free_port()  # --http

    def start(self):
        # Node.start runs `PREFIX chunkvol --pool P serve --socket S --listen L`; this prefix
        # execs that with `--http` added (the same process, so the same process group).
        self.prefix = ["sh", "-c", f'exec "$@" --http 127.0.0.1:{self.port}', "sh"]
        try:
            return super().start()
        finally:
            self.prefix = []

    def listen_port(self):
        return int(self.listen.rpartition(":")[2])

    def peer_row(self):
        (row,) = self.json("peer", "status")["peers"]
        return row

    def figure(self, name, **labels):
        """One sample of a scrape now (None when the scrape does not have it)."""
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    def write(self, data, offset):
        handle = self.connect(VOLUME)
        try:
            handle.pwrite(data, offset)
            handle.flush()
        finally:
            handle.shutdown()


@pytest.fixture
def pair(tmp_path):
    """Two served nodes of one pool paired both ways (`peer add`, with options for the link
    each ships over) and a multi-master volume on both; killed at the end, also on failure."""
    nodes = []

    def make(a_options=(), b_options=()):
        a, b = MonitoredNode(tmp_path, "A"), MonitoredNode(tmp_path, "B")
        nodes.extend((a, b))
        a.cv("init", "--chunk-size", "16M")
        join = str(tmp_path / "B.join")
        a.cv("join-file", join)
        b.cv("init", "--join", join)
        a.start()
        b.start()
        a.cv("peer", "add", "b", "--address", b.listen, *a_options)
        b.cv("peer", "add", "a", "--address", a.listen, *b_options)
        a.cv("volume", "create", VOLUME, "--size", "16M", "--mode", "multi-master")
        wait_for_volume(b, VOLUME)
        return a, b

    yield make
    for node in nodes:
        try:
            node.stop()  # SIGTERM: the log says everything
        finally:
            node.kill()


@contextlib.contextmanager
def unreachable(*nodes):
    """Every TCP packet to these nodes' replication listeners answered with a reset, until
    the block ends (the rules are removed whatever happens)."""
    added = []
    try:
        for node in nodes:
            rule = ["INPUT", "-p", "tcp", "--dport", str(node.listen_port()), "-j", "REJECT",
                    "--reject-with", "tcp-reset"]
            subprocess.run(["iptables", "-I", *rule], check=True, env=ENVIRONMENT)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-D", *rule], check=True, env=ENVIRONMENT)


def poll(what, sample, until=bool, timeout=DEADLINE_SECONDS):
    """sample() until until(its value) (the value is returned); fails after `timeout`
    seconds, saying `what` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = sample()
        if until(value):
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s; last: {value!r}"
        time.sleep(0.2)


def behind(node, peer, direction):
    return node.figure("chunkvol_peer_behind_bytes", peer=peer, direction=direction)


def out_beside_peer_status(node, peer):
    """(`peer status --json`'s outgoing row, the "out" figure) with the figure scraped between
    two `peer status` whose rows agree (but for seconds_behind, which grows with the time):
    the log grows by a heartbeat flush point every second or so and the shipper sends them,
    so a figure is compared only with a still log and shipper."""
    def bracket():
        before = node.peer_row()["outgoing"]
        scraped = behind(node, peer, "out")
        return before, scraped, node.peer_row()["outgoing"]

    def still(found):
        before, _, after = found
        return all(before[key] == after[key] for key in before if key != "seconds_behind")
    row, scraped, _ = poll(f"{node.name}'s out figure beside a still `peer status`", bracket, still)
    return row, scraped


def out_stays_zero(node, peer):
    """Whether every scrape for HEARTBEAT_SPAN seconds says the node's "out" figure is 0: each
    node of an idle pair makes a flush point every second, so both directions' records pass
    through each log all the time (a figure that counted the peer's own records after this
    node's last flush point was 0 for only part of each second, on one node or the other).
    Its own heartbeat, not acknowledged yet, is behind for milliseconds: retried."""
    end = time.monotonic() + HEARTBEAT_SPAN
    while time.monotonic() < end:
        if behind(node, peer, "out") != 0:
            return False
        time.sleep(0.05)
    return True


def test_peer_lag_out_matches_peer_status_in_is_sampled_and_both_fall_to_zero(pair):
    """Both links throttled; each node writes 1 MiB twice, a flush after each: the first
    flush interval goes at once, the second waits 256 s. Each node's "out" is what `peer
    status --json` says, at least that MiB, and the other's "in" (sampled from the peer)
    shows it too. The limits lifted and the nodes converged, all four figures are 0."""
    a, b = pair(a_options=("--bandwidth", SLOW), b_options=("--bandwidth", SLOW))
    for node, offset in ((a, 0), (b, 4 * MiB)):
        for _ in range(2):
            node.write(os.urandom(MiB), offset)
    for node, other, peer, back in ((a, b, "b", "a"), (b, a, "a", "b")):
        row, scraped = out_beside_peer_status(node, peer)
        assert scraped == row["bytes_behind"] >= MiB and row["records_behind"] > 0, (scraped, row)
        assert node.peer_row()["connected"]
        poll(f"{other.name}'s sampled in figure", lambda: behind(other, back, "in"),
             lambda found: (found or 0) >= MiB, timeout=SAMPLED_SECONDS)

    for node, peer in ((a, "b"), (b, "a")):  # lift the limits: each shipper takes the new definition
        mirrors = mirror_config.load_mirrors(node.pool)
        mirrors[peer]["bandwidth"] = None
        mirror_config.save_mirrors(node.pool, mirrors)
    wait_converged([a, b])
    for node, peer in ((a, "b"), (b, "a")):
        poll(f"{node.name}'s out figure at 0 for {HEARTBEAT_SPAN}s", lambda: out_stays_zero(node, peer))
        # A heartbeat not yet acknowledged is behind for a moment when the peer is sampled:
        # polled until a sample says 0 (a sample after the catch-up: it said >= 1 MiB before).
        poll(f"{node.name}'s in figure at 0", lambda: behind(node, peer, "in"), lambda found: found == 0,
             timeout=SAMPLED_SECONDS)


@needs_iptables
def test_conflicts_counted_on_both_nodes_as_the_conflicts_command_lists_them(pair):
    """Both write the same block of the multi-master volume while the link is cut both ways;
    healed and converged, each node's chunkvol_conflicts_total{volume} is what `conflicts
    --json` lists there, at least one."""
    a, b = pair()
    for node in (a, b):
        assert node.figure("chunkvol_conflicts_total", volume=VOLUME) == 0
    with unreachable(a, b):
        a.write(os.urandom(BLOCK), 8 * MiB)
        b.write(os.urandom(BLOCK), 8 * MiB)
        for node in (a, b):  # nothing went over: neither saw the other's write
            assert not node.peer_row()["connected"]
    wait_converged([a, b])
    for node in (a, b):
        listed = len(node.json("conflicts", VOLUME)["conflicts"])
        assert listed >= 1, f"no conflict on {node.name}"
        assert node.json("peer", "status")["conflicts"] == {VOLUME: listed}
        poll(f"{node.name}'s conflicts figure equal to `conflicts` ({listed})",
             lambda: node.figure("chunkvol_conflicts_total", volume=VOLUME), lambda found: found == listed)
    assert a.read(VOLUME, 16 * MiB) == b.read(VOLUME, 16 * MiB)


@needs_iptables
def test_peer_errors_counted_while_the_peer_is_unreachable(pair):
    """A's link to B cut (B's listener resets A's connections); A writes: its shipper's
    failures reach chunkvol_errors_total{kind="peer"} on A through the file it publishes;
    healed, the nodes converge and the count stays (a counter)."""
    a, b = pair()
    before = a.figure("chunkvol_errors_total", kind="peer")
    with unreachable(b):
        a.write(os.urandom(MiB), 0)
        failed = poll("A's peer errors", lambda: a.figure("chunkvol_errors_total", kind="peer"),
                      lambda found: found >= before + 1)
        # The new ones are its shipper's, read from the file it publishes (which only grows).
        assert read_counts(shipper_counts_path(a.pool))["peer"] >= failed - before
        row = a.peer_row()
        assert not row["connected"] and row["outgoing"]["last_error"], row
        assert row["outgoing"]["bytes_behind"] >= MiB
    wait_converged([a, b])
    assert a.figure("chunkvol_errors_total", kind="peer") >= failed >= 1


def test_the_in_figure_is_0_once_every_record_of_the_peer_is_here(monkeypatch):
    """The peer's own count past its cursor includes this node's records that arrived after
    its last flush point (it never ships them back): once this node holds every record of the
    peer's (its `next_sequence` - 1), the "in" figure is 0, whatever that count; before, it is
    the count. (The end-to-end test above samples this every 10 s: it could miss it.)"""
    peer_node, held = 7, 41
    pool = SimpleNamespace(fields={}, path="/nowhere", lock=threading.Lock(), origins={peer_node: held})
    figures = PoolFigures(pool)
    for next_sequence, expected in ((held + 1, 0), (held + 2, 96)):
        link = SimpleNamespace(peer=peer_node, status={"next_sequence": next_sequence, "bytes_behind": 96},
                               close=lambda: None)
        monkeypatch.setattr(monitor_figures.targets, "open_target", lambda *_, link=link: link)
        assert figures.incoming_lag({"to": "node:127.0.0.1:1"}) == expected
