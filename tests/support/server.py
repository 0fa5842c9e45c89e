"""Start and stop real nbdkit servers running chunkvol's plugin, for tests and tools.

Every server listens on a Unix socket in a private directory and is stopped by its process
id, also when a test fails.
"""

import os
import signal
import subprocess
import time

import nbd

from tests.support.paths import ROOT

PLUGIN = os.path.join(ROOT, "nbdkit_plugin", "chunkvol_plugin.py")
CHUNKVOL = os.path.join(ROOT, ".venv", "bin", "chunkvol")
ENVIRONMENT = dict(os.environ, PATH="/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", ""))


def chunkvol(*arguments, check=True, env=None):
    """Run the `chunkvol` command; returns the CompletedProcess (text). env: the environment
    (ENVIRONMENT if None)."""
    result = subprocess.run([CHUNKVOL, *arguments], capture_output=True, text=True, env=env or ENVIRONMENT)
    if check and result.returncode != 0:
        raise AssertionError(f"chunkvol {' '.join(arguments)} failed ({result.returncode}): {result.stderr}")
    return result


class NbdServer:
    """`nbdkit -f -U SOCKET python chunkvol_plugin.py pool=POOL [keys]` in the background."""

    def __init__(self, pool, socket_path, *keys, log_path=None):
        self.pool = pool
        self.socket_path = socket_path
        self.keys = keys
        self.log_path = log_path or socket_path + ".log"
        self.process = None

    def start(self, timeout_seconds=30):
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            ["/usr/bin/nbdkit", "-f", "-U", self.socket_path, "python", PLUGIN, f"pool={self.pool}", *self.keys],
            stdout=log, stderr=log, env=ENVIRONMENT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nbdkit exited with {self.process.returncode}: {self.log()}")
            if os.path.exists(self.socket_path):
                try:
                    handle = self.connect(None)
                    handle.opt_abort()
                    return self
                except nbd.Error:
                    pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"nbdkit did not start: {self.log()}")

    def uri(self, export):
        return f"nbd+unix:///{export}?socket={self.socket_path}"

    def connect(self, export="disk0", meta_context=True):
        handle = nbd.NBD()
        if meta_context:
            handle.add_meta_context("base:allocation")
        if export is None:
            handle.set_opt_mode(True)
            handle.connect_unix(self.socket_path)
            return handle
        handle.set_export_name(export)
        handle.connect_unix(self.socket_path)
        return handle

    def log(self):
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read().decode(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def kill(self, signum=signal.SIGKILL):
        """Kill the whole process group (nbdkit and anything it started); wait for it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def stop(self):
        """A clean stop: SIGTERM, so the plugin's cleanup checkpoints the pool."""
        self.kill(signal.SIGTERM)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill(signal.SIGTERM)
