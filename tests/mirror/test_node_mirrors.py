"""Mirrors to another node of the pool over TCP and mutual TLS: `join-file`, `init --join`,
`receive --listen`, `serve --listen`, `mirror add NAME --to node:HOST:PORT`; and every way a
peer can be wrong (not a node, a node of another pool, malformed, forged, replayed, too
slow) is refused with a clear error and changes nothing."""

import json
import os
import signal
import ssl
import subprocess
import time

import nbd
import pytest

from chunkvol.errors import UnreachableError
from chunkvol.format import mirror_state, wire
from chunkvol.mirror import identity, node_link
from chunkvol.mirror.node_link import NodeTarget, ReceiverServer
from chunkvol.network import Network
from chunkvol.pool import Pool
from tests.support.faulty_network import FaultyNetwork, Fired, LinkFault
from tests.support.mirrors import (Serve, assert_identical, cv, log_batch, new_source, status, wait_caught_up,
                                   write_history)
from tests.support.nodes import Receiving, free_port, joined
from tests.support.server import CHUNKVOL, ENVIRONMENT


@pytest.fixture
def receivers():
    started = []
    yield started
    for receiving in started:
        receiving.kill()


def test_node_mirror_over_tls_resumes_after_kill9_of_the_receiver(tmp_path, receivers):
    source = new_source(tmp_path)
    write_history(source, 11)
    node = joined(tmp_path, source)
    assert json.loads(cv(node, "status", "--json").stdout)["role"] == "mirror"
    port = free_port()
    receiving = Receiving(node, port, str(tmp_path / "receive.log")).start()
    receivers.append(receiving)
    # At 4 MB/s the sync takes seconds, a batch (one second of bandwidth) at a time.
    cv(source, "mirror", "add", "n2", "--to", f"node:127.0.0.1:{port}", "--bandwidth", "4M")
    total = status(source, "n2")["bytes_behind"]
    assert total > 4 * (4 << 20), f"too little history ({total} bytes) to catch the sync half way"
    # Kill the receiver once the sync has shipped part of the log (the cursor moved, some is
    # still behind); the sync fails clearly; a restart resumes from the cursor.
    sync = subprocess.Popen([CHUNKVOL, "--pool", source, "mirror", "sync", "n2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
    state_path = os.path.join(source, "mirrors", "n2.state")
    deadline = time.monotonic() + 60
    while not (os.path.exists(state_path)
               and mirror_state.decode(open(state_path, "rb").read())["shipped_bytes"] > 0):
        assert sync.poll() is None and time.monotonic() < deadline, "the sync never moved its cursor"
        time.sleep(0.05)
    receiving.kill()
    out, err = sync.communicate(timeout=60)
    assert sync.returncode != 0, "a sync whose receiver was killed half way reported success"
    assert "127.0.0.1" in err and "Traceback" not in err, err
    half_way = status(source, "n2")
    assert half_way["last_error"] and 0 < half_way["bytes_behind"] < total, half_way
    receiving.start()
    cv(source, "mirror", "sync", "n2")
    row = status(source, "n2")
    assert row["shipped_bytes"] < total + half_way["shipped_bytes"], "the sync started over"
    assert row["bytes_behind"] == 0 and row["last_error"] is None
    write_history(source, 12, rounds=1, first=False)
    cv(source, "mirror", "sync", "n2")
    receiving.kill(signal.SIGTERM)
    assert_identical(source, node)
    # The node is a whole pool: promoted, it takes writes of its own.
    cv(node, "mirror", "promote")
    cv(node, "volume", "create", "mine", "--size", "1M")


def test_served_nodes_ship_continuously(tmp_path):
    """`serve --listen` on the mirror node and `serve` on the source: the source's shipper
    sends what clients write; the mirror serves it read-only as it arrives."""
    source = new_source(tmp_path)
    node = joined(tmp_path, source)
    port = free_port()
    mirror_serve = Serve(node, str(tmp_path / "node.sock"), str(tmp_path / "node.log"))
    source_serve = Serve(source, str(tmp_path / "src.sock"), str(tmp_path / "src.log"))
    try:
        _start_with(mirror_serve, "--listen", f"127.0.0.1:{port}")
        source_serve.start()
        cv(source, "mirror", "add", "n2", "--to", f"node:127.0.0.1:{port}")
        handle = source_serve.connect()
        data = os.urandom(4 << 20)
        handle.pwrite(data, 8 << 20)
        handle.flush()
        wait_caught_up(source, "n2")
        reader = mirror_serve.connect()
        assert reader.is_read_only()
        assert reader.pread(len(data), 8 << 20) == data
        mirror_serve.kill()  # the mirror machine goes away; the source keeps serving
        handle.pwrite(data[::-1], 0)
        handle.flush()
        time.sleep(1.5)
        assert status(source, "n2")["bytes_behind"] > 0
        _start_with(mirror_serve, "--listen", f"127.0.0.1:{port}")
        wait_caught_up(source, "n2")
        assert mirror_serve.connect().pread(len(data), 0) == data[::-1]
    finally:
        source_serve.kill()
        mirror_serve.kill()
    assert_identical(source, node)


def _start_with(serve, *extra):
    log = open(serve.log_path, "ab")
    serve.process = subprocess.Popen([CHUNKVOL, "--pool", serve.pool, "serve", "--socket", serve.socket_path, *extra],
                                     stdout=log, stderr=log, env=ENVIRONMENT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.exists(serve.socket_path):
            try:
                handle = nbd.NBD()
                handle.set_opt_mode(True)
                handle.connect_unix(serve.socket_path)
                handle.opt_abort()
                return
            except nbd.Error:
                pass
        time.sleep(0.1)
    raise AssertionError(open(serve.log_path).read())


# ---- hostile and broken peers --------------------------------------------------------------

@pytest.fixture
def receiving_node(tmp_path):
    source = new_source(tmp_path)
    write_history(source, 13, rounds=1)
    node = joined(tmp_path, source)
    lines = []
    pool = Pool.open(node)
    server = ReceiverServer(pool, "127.0.0.1", 0, log=lines.append).start()
    yield source, node, pool, server, lines
    server.stop()
    pool.close()


def _tls(source, port):
    """A hand-written peer's TLS connection, made through the network seam as a node's is."""
    network = Network()
    return network.tls_client(identity.client_context(source), network.connect(("127.0.0.1", port), 10))


def _hello(connection, source, node_id=None):
    fields = Pool.read_metadata(source)
    connection.sendall(wire.encode_json(wire.HELLO, {"pool_uuid": fields["pool_uuid"],
                                                     "node_id": fields["node_id"] if node_id is None else node_id,
                                                     "version": 1}))
    return fields


def _send(connection, data):
    """Send as a hostile peer does: the server may hang up half way, which is the point."""
    try:
        connection.sendall(data)
    except (OSError, ssl.SSLError):
        pass


def _refused(lines, words, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(words in line for line in lines):
            return
        time.sleep(0.05)
    raise AssertionError(f"no refusal with {words!r} in {lines}")


def test_peers_that_are_not_nodes_of_this_pool_are_refused(receiving_node, tmp_path):
    source, node, pool, server, lines = receiving_node
    before = (pool.writer.position, dict(pool.origins))
    with Network().connect(("127.0.0.1", server.port), 10) as plain:
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
    _refused(lines, "TLS handshake failed")
    other = new_source(tmp_path, "other")
    cv(other, "mirror", "add", "x", "--to", f"node:127.0.0.1:{server.port}")
    result = cv(other, "mirror", "sync", "x", check=False)
    assert result.returncode == 1 and "not a node of this pool" in result.stderr
    _refused(lines, "unknown ca")
    assert (pool.writer.position, dict(pool.origins)) == before


@pytest.mark.parametrize("case", ["bad magic", "oversized", "checksum", "hello as another node",
                                  "records of another node", "forged record"])
def test_broken_or_hostile_frames_are_refused_and_change_nothing(receiving_node, case):
    source, node, pool, server, lines = receiving_node
    before = (pool.writer.position, dict(pool.origins))
    fields, records = log_batch(source)
    connection = _tls(source, server.port)
    if case == "hello as another node":
        _hello(connection, source, node_id=fields["node_id"] + 1)
        _refused(lines, "does not match the certificate")
    else:
        _hello(connection, source)
        kind, payload = node_link.read_frame(connection)
        assert kind == wire.WELCOME and wire.decode_json(payload)["have"] == 0
        frame = wire.encode_batch(fields["node_id"], records)
        if case == "bad magic":
            _send(connection, b"XXXX" + frame[4:])
            _refused(lines, "not a chunkvol replication frame")
        elif case == "oversized":
            _send(connection, wire.HEAD.pack(wire.MAGIC, wire.BATCH, b"\0\0\0", wire.MAX_PAYLOAD + 1, 0))
            _refused(lines, "over the limit")
        elif case == "checksum":
            broken = bytearray(frame)
            broken[-1] ^= 1
            _send(connection, bytes(broken))
            _refused(lines, "does not match its checksum")
        elif case == "records of another node":
            _send(connection, wire.encode_batch(fields["node_id"] + 1, records))
            _refused(lines, "sent records of node")
        elif case == "forged record":
            forged = list(records)
            damaged = bytearray(forged[3])
            damaged[80] ^= 0xFF
            forged[3] = bytes(damaged)
            _send(connection, wire.encode_batch(fields["node_id"], forged))
            _refused(lines, "record 3 of the batch")
            kind, payload = node_link.read_frame(connection)
            assert kind == wire.ERROR and "record 3" in wire.decode_json(payload)["message"]
    try:
        connection.close()
    except (OSError, ssl.SSLError):
        pass
    assert (pool.writer.position, dict(pool.origins)) == before, case


@pytest.mark.parametrize("case", ["cut mid-frame", "slow drip"])
def test_a_link_cut_or_dripping_mid_frame_is_refused_and_changes_nothing(receiving_node, case, monkeypatch):
    """A node's own shipping link (NodeTarget) through the fault layer, below TLS: cut half way
    through a batch (a torn TLS record, then a FIN), or paced far below the rate a frame must
    keep. The receiver refuses it, saying why, and applies nothing."""
    source, node, pool, server, lines = receiving_node
    before = (pool.writer.position, dict(pool.origins))
    fields, records = log_batch(source)
    frame_bytes = len(wire.encode_batch(fields["node_id"], records))
    if case == "cut mid-frame":
        fault, words = LinkFault("cut", after_bytes=frame_bytes // 2), "in the middle of a frame"
    else:  # the limit, made reachable: a frame must arrive within 1 s plus 1 s per GiB
        monkeypatch.setattr(node_link, "FRAME_GRACE_SECONDS", 1.0)
        monkeypatch.setattr(node_link, "MIN_BYTES_PER_SECOND", 1 << 30)
        fault, words = LinkFault("throttle", bytes_per_second=64 << 10), "too slow"
    network = FaultyNetwork([fault])
    target = NodeTarget("127.0.0.1", server.port, fields, source, network=network)
    try:
        with pytest.raises(UnreachableError):
            target.send(fields["node_id"], records)
    finally:
        target.close()
    _refused(lines, words)
    if case == "cut mid-frame":
        assert network.fired == [Fired("cut", "client", 1, frame_bytes // 2)]
    assert (pool.writer.position, dict(pool.origins)) == before, case


def test_a_replayed_batch_is_applied_once(receiving_node):
    source, node, pool, server, lines = receiving_node
    fields, records = log_batch(source)
    for attempt in range(2):
        connection = _tls(source, server.port)
        _hello(connection, source)
        node_link.read_frame(connection)
        connection.sendall(wire.encode_batch(fields["node_id"], records))
        kind, payload = node_link.read_frame(connection)
        assert kind == wire.ACK
        if attempt == 0:
            position = pool.writer.position
        connection.close()
    assert pool.writer.position == position
    assert not any("refused" in line for line in lines), lines
