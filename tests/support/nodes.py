"""Another node of a pool, as the mirror tests make one: a free TCP port, a node joined with
`join-file` and `init --join`, and `chunkvol receive --listen` in the background."""

import os
import signal
import socket
import subprocess
import time

from tests.support.mirrors import cv
from tests.support.server import CHUNKVOL, ENVIRONMENT


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def joined(tmp_path, source, name="node2"):
    """A new node of SOURCE's pool at tmp_path/NAME (checking what `join-file` promises)."""
    join = str(tmp_path / f"{name}.join")
    result = cv(source, "join-file", join)
    assert "keep it secret" in result.stdout
    assert os.stat(join).st_mode & 0o777 == 0o600
    assert cv(source, "join-file", join, check=False).returncode == 2, "a join file is never overwritten"
    path = str(tmp_path / name)
    assert "as node" in cv(path, "init", "--join", join).stdout
    return path


class Receiving:
    """`chunkvol receive --listen` in the background (stopped by the fixture)."""

    def __init__(self, pool, port, log_path):
        self.pool, self.port, self.log_path = pool, port, log_path
        self.process = None

    def start(self):
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([CHUNKVOL, "--pool", self.pool, "receive", "--listen", f"127.0.0.1:{self.port}"],
                                        stdout=log, stderr=log, env=ENVIRONMENT)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(open(self.log_path).read())

    def log(self):
        with open(self.log_path) as handle:
            return handle.read()

    def kill(self, signum=signal.SIGKILL):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout=30)
        self.process = None
