"""`chunkvol serve`: foreground nbdkit on a Unix socket and TCP, clean stop on SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import time

import nbd

from tests.server import CHUNKVOL, ENVIRONMENT, chunkvol


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
