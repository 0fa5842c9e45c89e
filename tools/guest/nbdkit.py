"""Start an nbdkit server on a Unix socket for the lifetime of a `with` block.

Why: the real-client tests need *some* NBD export.  Today that is nbdkit's
memory or file plugin; later it is chunkvol's Python plugin.  All of them are
started the same way (`nbdkit -f -U SOCK PLUGIN ARGS...`), so one helper
serves all: pass the plugin and its arguments, get the socket path back.

The server is started with --exit-with-parent so that even a SIGKILLed test
run leaves no nbdkit behind, and with -P so that "ready" means nbdkit wrote its
PID file (it does so only once the socket is listening), not "a file appeared".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from . import _proc


@dataclasses.dataclass
class Server:
    """A running nbdkit.  Usable wherever a socket path is expected (os.fspath/str give it)."""
    socket: str
    log: Path
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server (default SIGKILL: a crash, for crash-consistency tests) and reap it."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def __fspath__(self) -> str:
        return self.socket

    def __str__(self) -> str:
        return self.socket


@contextlib.contextmanager
def served(plugin_args: Sequence[str], workdir: str | os.PathLike, *,
           name: str = "nbdkit", extra_options: Sequence[str] = (),
           ready_timeout: float = 60) -> Iterator[Server]:
    """Run `nbdkit -f -U WORKDIR/NAME.sock [extra_options] PLUGIN_ARGS...`; yield a Server.

    Examples:
        served(["memory", "1G"], tmp)
        served(["file", "dir=/path/to/dir"], tmp)          # export name = file name
        served(["python", "nbdkit_plugin/chunkvol_plugin.py", f"pool={pool}"], tmp)

    The server's output goes to WORKDIR/NAME.log (quoted in errors).  If
    WORKDIR is too deep for a Unix socket path, the socket goes to a short
    temporary directory instead (removed afterwards).  On exit
    nbdkit gets SIGTERM (SIGKILL if it lingers) by PID.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / f"{name}.sock"
    short_dir = None
    if len(str(sock)) > 100:  # AF_UNIX paths are limited to 107 bytes
        short_dir = Path(tempfile.mkdtemp(prefix="nbd-"))
        sock = short_dir / f"{name}.sock"
    pidfile = workdir / f"{name}.pid"
    log = workdir / f"{name}.log"
    for stale in (sock, pidfile):
        stale.unlink(missing_ok=True)
    argv = [_proc.which("nbdkit"), "-f", "--exit-with-parent", "-U", str(sock), "-P", str(pidfile),
            *extra_options, *plugin_args]
    with open(log, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                env=_proc.system_env())
    try:
        def dead() -> str | None:
            if proc.poll() is not None:
                return f"nbdkit exited {proc.returncode}: {_proc.read_tail(log)}"
            return None
        _proc.wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "" and sock.exists(),
                       timeout=ready_timeout, what=f"nbdkit socket {sock}", alive=dead)
        yield Server(socket=str(sock), log=log, process=proc)
    finally:
        _proc.stop_process(proc)
        sock.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)
