"""A node mirror over a real slow, lossy link: a network namespace behind a veth pair shaped by
`tc tbf` with random drop by iptables (tools/netlab.py). The mirror catches up at the link's
rate, survives a kill -9 of the receiver, and ends byte-identical. Figures (link rate, catch-up
rate, bytes shipped per byte written) are printed as JSON. Partitions and latency of a node
mirror are tested through the network seam instead (tests/mirror/test_network_faults.py),
and real partitions in tests/mirror/test_multimaster_nodes.py."""

import json
import os
import socket
import subprocess
import time

import pytest

from chunkvol.format import mirror_state
from chunkvol.pool import Pool
from tests.support.mirrors import assert_identical, cv, new_source, status
from tests.support.nodes import joined
from tests.support.server import CHUNKVOL, ENVIRONMENT
from tools.netlab import SlowLink

MiB = 1 << 20
RATE_BITS = 16_000_000
PORT = 10907

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def _receive(link, node, log_path):
    log = open(log_path, "ab")
    process = link.run([CHUNKVOL, "--pool", node, "receive", "--listen", f"{link.inner}:{PORT}"],
                       stdout=log, stderr=log, env=ENVIRONMENT)
    log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection((link.inner, PORT), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.1)
    raise AssertionError(open(log_path).read())


def _shipped_bytes(state_path):
    """What the sync process has had acknowledged so far (its durable state, read while it runs)."""
    with open(state_path, "rb") as handle:
        return mirror_state.decode(handle.read())["shipped_bytes"]


def _write(source, seed, megabytes):
    rng = __import__("random").Random(seed)
    with Pool.open(source) as pool:
        volume = pool.volume("v")
        for index in range(megabytes):
            volume.write(rng.randbytes(MiB), (index % 40) * MiB)
            if index % 4 == 3:
                pool.flush()


def test_mirror_over_a_shaped_lossy_link_catches_up_and_survives_cuts(tmp_path):
    source = new_source(tmp_path)
    node = joined(tmp_path, source)
    with SlowLink(rate=f"{RATE_BITS // 1000}kbit", loss=0.02) as link:
        receiver = _receive(link, node, str(tmp_path / "receive.log"))
        cv(source, "mirror", "add", "far", "--to", f"node:{link.inner}:{PORT}")
        _write(source, 1, 8)
        behind = status(source, "far")["bytes_behind"]
        started = time.monotonic()
        cv(source, "mirror", "sync", "far")
        elapsed = time.monotonic() - started
        shipped = status(source, "far")["shipped_bytes"]
        link_bytes_per_second = RATE_BITS / 8
        assert elapsed >= shipped / link_bytes_per_second * 0.8, "the link was not shaped"

        # kill -9 of the receiver in the middle of a sync (its first batch of 8 MiB acknowledged,
        # the rest in flight), then a restart.
        _write(source, 2, 4)
        _write(source, 4, 8)
        state_path = os.path.join(source, "mirrors", "far.state")
        shipped_before = _shipped_bytes(state_path)
        sync = subprocess.Popen([CHUNKVOL, "--pool", source, "mirror", "sync", "far"], env=ENVIRONMENT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while _shipped_bytes(state_path) == shipped_before:
            assert sync.poll() is None and time.monotonic() < deadline, "the sync never moved its cursor"
            time.sleep(0.05)
        receiver.kill()
        receiver.wait()
        _, err = sync.communicate(timeout=120)
        assert sync.returncode == 1 and link.inner in err and "Traceback" not in err, err
        assert status(source, "far")["bytes_behind"] > 0
        receiver = _receive(link, node, str(tmp_path / "receive.log"))
        cv(source, "mirror", "sync", "far")
        row = status(source, "far")
        assert row["bytes_behind"] == 0 and row["last_error"] is None
        written = 20 * MiB
        print(json.dumps({"test": "mirror_slow_link", "link_bytes_per_second": link_bytes_per_second,
                          "loss": 0.02, "first_catch_up_bytes": behind,
                          "catch_up_bytes_per_second": round(shipped / elapsed),
                          "catch_up_vs_link": round(shipped / elapsed / link_bytes_per_second, 3),
                          "shipped_bytes": row["shipped_bytes"],
                          "shipped_per_written": round(row["shipped_bytes"] / written, 3)}))
        receiver.terminate()
        receiver.wait()
    assert_identical(source, node)
