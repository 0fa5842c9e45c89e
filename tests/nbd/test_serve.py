"""`chunkvol serve`: foreground nbdkit on a Unix socket and TCP, clean stop on SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import time

import nbd

from tests.support.server import CHUNKVOL, ENVIRONMENT, chunkvol


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_connect(uri, process):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "serve exited early"
        try:
            handle = nbd.NBD()
            handle.connect_uri(uri)
            return handle
        except nbd.Error:
            time.sleep(0.1)
    raise AssertionError(f"could not connect to {uri}")


def test_serve_socket_and_tcp_then_sigterm_is_clean(pool_path, tmp_path):
    socket_path = str(tmp_path / "serve.sock")
    port = _free_port()
    process = subprocess.Popen([CHUNKVOL, "--pool", pool_path, "serve", "--socket", socket_path,
                                "--port", str(port), "--print-attach"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
    try:
        data = os.urandom(256 << 10)
        unix = _wait_connect(f"nbd+unix:///disk0?socket={socket_path}", process)
        unix.pwrite(data, 0)
        unix.flush()
        unix.shutdown()
        tcp = _wait_connect(f"nbd://127.0.0.1:{port}/disk0", process)
        assert tcp.pread(len(data), 0) == data
        tcp.shutdown()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = process.stdout.read()
    assert "nbdinfo" in output and "qemu-system-x86_64" in output and "nbdfuse" in output
    assert not os.path.exists(socket_path)
    report = json.loads(chunkvol("--pool", pool_path, "status", "--json").stdout)
    assert report["log"]["records_replayed_at_open"] == 0, "a clean stop checkpoints everything"


def test_serve_missing_pool_is_one_clear_line(tmp_path):
    result = chunkvol("--pool", str(tmp_path / "nope"), "serve", "--socket", str(tmp_path / "s"), check=False)
    assert result.returncode == 3
    assert "no pool at" in result.stderr and "Traceback" not in result.stderr


def _silent_client(connect):
    """A client that reads the server's greeting and then says nothing (a stuck or hostile
    peer, or a kernel nbd-client whose own root disk is on this server)."""
    silent = connect()
    greeting = b""
    while len(greeting) < 18:  # "NBDMAGIC" "IHAVEOPT" and the handshake flags
        chunk = silent.recv(18 - len(greeting))
        assert chunk, "the server closed the connection before its greeting"
        greeting += chunk
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    return silent


def _serves_beside(handle_factory, timeout_seconds=30):
    """Connect, write, flush and read back in a thread; True when it finished in time."""
    import threading
    outcome = []

    def work():
        handle = handle_factory()
        data = bytes(range(256)) * 256
        handle.pwrite(data, 4096)
        handle.flush()
        outcome.append(handle.pread(len(data), 4096) == data)
        handle.shutdown()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout_seconds)
    return outcome == [True]


def test_a_client_silent_in_the_handshake_holds_up_no_other(pool_path, tmp_path):
    """One client reads the greeting and then sends nothing; another client, on the Unix socket
    and on TCP, still connects, writes, flushes and reads while the silent one stays connected
    (issue 14, item 8: nbdkit's serialize-all-requests model held its one lock through each
    handshake, and every volume of the server stood still)."""
    socket_path = str(tmp_path / "serve.sock")
    port = _free_port()
    process = subprocess.Popen([CHUNKVOL, "--pool", pool_path, "serve", "--socket", socket_path,
                                "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
    silent_clients = []
    try:
        unix_uri, tcp_uri = f"nbd+unix:///disk0?socket={socket_path}", f"nbd://127.0.0.1:{port}/disk0"
        _wait_connect(unix_uri, process).shutdown()
        _wait_connect(tcp_uri, process).shutdown()

        def over_unix():
            connection = socket.socket(socket.AF_UNIX)
            connection.connect(socket_path)
            return connection

        for make_silent in (over_unix, lambda: socket.create_connection(("127.0.0.1", port))):
            silent_clients.append(_silent_client(make_silent))
            for uri in (unix_uri, tcp_uri):
                def connected(uri=uri):
                    handle = nbd.NBD()
                    handle.connect_uri(uri)
                    return handle
                assert _serves_beside(connected), f"{uri} stood still beside a silent client"
        for silent in silent_clients:
            silent.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        for silent in silent_clients:
            silent.close()
        if process.poll() is None:
            process.kill()
            process.wait()
