"""Subprocess plumbing shared by the guest tools.

Why a module of its own: every tool here shells out to system programs (nbdfuse,
losetup, mkfs, qemu, ...) and they must all be found the same way and fail the
same way.  pyenv shims sit before /usr/bin on developer PATHs and shadow the
Debian python that libnbd's scripts need, so system directories go first.  A
failed command raises `CommandError` carrying its stderr, because "exit status
32" alone is useless in a test report.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Callable, Sequence

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def system_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for system tools: system dirs first on PATH."""
    env = dict(os.environ)
    env["PATH"] = SYSTEM_PATH + ":" + env.get("PATH", "")
    env.setdefault("LC_ALL", "C")
    if extra:
        env.update(extra)
    return env


def which(name: str) -> str:
    """Absolute path of a system program, or a clear error naming the package gap."""
    path = shutil.which(name, path=system_env()["PATH"])
    if path is None:
        raise FileNotFoundError(f"required program {name!r} not found (is its Debian package installed?)")
    return path


class CommandError(RuntimeError):
    """A command exited non-zero; the message holds the command line and its output."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr or stdout).strip()[-2000:]
        super().__init__(f"{' '.join(map(str, argv))} exited {returncode}: {tail}")


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 300,
        input: str | bytes | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion, capturing text output; raise CommandError on failure."""
    argv = [str(a) for a in argv]
    if "/" not in argv[0]:
        argv[0] = which(argv[0])
    text = not isinstance(input, bytes)
    proc = subprocess.run(argv, capture_output=True, text=text, timeout=timeout,
                          input=input, env=system_env(), stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        out = proc.stdout if text else proc.stdout.decode(errors="replace")
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise CommandError(argv, proc.returncode, out, err)
    return proc


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str,
             interval: float = 0.05, alive: Callable[[], str | None] | None = None) -> None:
    """Poll until predicate() is true.

    The timeout only stops a hang from eating the whole test run; it is not an
    assertion about speed, so callers pass generous values.  `alive` may return
    an error text (e.g. "nbdfuse exited 1: ...") to fail fast when the process
    we are waiting on has already died.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if alive is not None:
            problem = alive()
            if problem:
                raise RuntimeError(f"while waiting for {what}: {problem}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, *, grace: float = 10) -> int | None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL after `grace` s."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
        except ProcessLookupError:
            pass
    return proc.returncode


def read_tail(path: str | os.PathLike, limit: int = 4000) -> str:
    """The end of a log file, for error messages; empty if it does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
