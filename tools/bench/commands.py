"""Running the external tools (fio, nbdcopy, qemu-img, chunkvol) and timing them.

Why a module of its own: every measured command needs the same three things: Debian's
tools first on PATH (nbdsh/nbdcopy and the nbdkit Python plugin break under a pyenv shim
or a venv python), its CPU time charged to it alone (``os.wait4`` gives the child's own
rusage, so the client's CPU is known apart from the server's and the harness's), and its
command line kept verbatim for the report.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass

SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


def tool_environment() -> dict[str, str]:
    """The environment for every child: /usr/bin first, so Debian's tools and python3 win."""
    environment = dict(os.environ)
    environment["PATH"] = SYSTEM_PATH + ":" + environment.get("PATH", "")
    environment.pop("PYTHONHOME", None)
    return environment


def quote(argv: list[str]) -> str:
    """The command line as a shell would need it, for the report."""
    return shlex.join(str(argument) for argument in argv)


class CommandFailed(RuntimeError):
    """A command exited non-zero; the message holds its command line and the end of its output."""

    def __init__(self, argv: list[str], returncode: int, output: str):
        tail = "\n".join(output.strip().splitlines()[-8:])
        super().__init__(f"`{quote(argv)}` exited {returncode}: {tail}")
        self.returncode = returncode


@dataclass
class Completed:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    cpu_seconds: float

    def check(self) -> "Completed":
        if self.returncode != 0:
            # fio prints its whole JSON even when it fails; the reason is on stderr.
            raise CommandFailed(self.argv, self.returncode, self.stderr if self.stderr.strip() else self.stdout)
        return self


def run_measured(argv: list[str], cwd: str | None = None) -> Completed:
    """Run a command to its end; return its output, wall time and its own CPU time."""
    with tempfile.TemporaryFile("w+") as stdout_file, tempfile.TemporaryFile("w+") as stderr_file:
        start = time.perf_counter()
        process = subprocess.Popen([str(argument) for argument in argv], stdout=stdout_file,
                                   stderr=stderr_file, stdin=subprocess.DEVNULL,
                                   env=tool_environment(), cwd=cwd)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        wall_seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout_file.seek(0)
        stderr_file.seek(0)
        return Completed(argv=[str(argument) for argument in argv], returncode=process.returncode,
                         stdout=stdout_file.read(), stderr=stderr_file.read(),
                         wall_seconds=wall_seconds, cpu_seconds=usage.ru_utime + usage.ru_stime)


def run_checked(argv: list[str], cwd: str | None = None) -> Completed:
    """Run a setup command; raise CommandFailed (with its output) if it fails."""
    return run_measured(argv, cwd=cwd).check()
