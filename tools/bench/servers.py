"""The NBD servers under test: how each one's backing store is made, started and stopped.

Why these servers: chunkvol's numbers mean little alone on a 2-vCPU VM whose disk is
host-cached, so every run measures anchors on the same disk, at the same moment:

- ``mem``: nbdkit's C memory plugin, the transport ceiling (Unix socket, nbdkit, fio).
- ``file``: nbdkit's file plugin on a raw file on the scratch disk: a plain disk image.
- ``qcow2`` / ``qcow2zstd``: qemu-nbd on qcow2, the usual image format. qemu writes
  compressed clusters only through ``qemu-img convert -c``, so ``qcow2zstd`` is prefilled
  that way (compressed data) and its later writes are qemu's ordinary uncompressed writes.
- ``pymem`` / ``pymem-parallel``: a bytearray behind nbdkit's Python plugin, the Python
  ceiling (tools/bench/plugins/pymem.py), with the serialized and parallel thread models.
- ``chunkvol-none`` / ``chunkvol-zstd`` (and variants): the store under test.

Every server listens on a Unix socket, runs in the foreground in its own session (so a
Ctrl-C reaches the harness, which stops the server in order, instead of the server dying
mid-write), and is stopped by its PID with SIGTERM (a clean stop, which is what lets
chunkvol checkpoint), then SIGKILL if it does not exit. ``stop_all`` runs on every exit path.
"""

from __future__ import annotations

import abc
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbd

import procstat
from commands import CommandFailed, quote, run_checked, tool_environment
from datagen import data_image
from sizes import format_size

READY_POLL_SECONDS = 0.005
STOP_GRACE_SECONDS = 600.0


class SetupFailed(RuntimeError):
    """A server could not be set up or started; the message says why, for the skip line."""


@dataclass
class BenchPaths:
    """Where things are: the repository, the scratch folder, this run's own folder and
    socket (named after the harness's PID, so nothing else that uses the scratch folder can
    take over the socket path), the venv."""
    repo_root: Path
    scratch: Path
    run_dir: Path
    socket: Path
    venv_bin: Path
    compress_percent: int = 50


@dataclass
class Prepared:
    """What a server's setup did that the report should show (e.g. a prefill by qemu-img)."""
    commands: list[str] = field(default_factory=list)
    prefill: dict | None = None


class Server(abc.ABC):
    """One kind of server. Subclasses say how to make its store and its command line."""

    name = ""
    description = ""
    export_name = "bench"
    is_chunkvol = False
    prefilled_by_setup = False

    def check_available(self, paths: BenchPaths) -> None:
        """Raise SetupFailed if something this server needs is missing."""

    def setup(self, workdir: Path, size_bytes: int, paths: BenchPaths) -> Prepared:
        """Make the backing store in ``workdir`` (empty and fresh for every lifecycle)."""
        return Prepared()

    def setup_blank(self, workdir: Path, size_bytes: int, paths: BenchPaths) -> Prepared:
        """Make an empty store, never prefilled (the sustained write); the same as ``setup`` except
        for a server whose setup prefills."""
        return self.setup(workdir, size_bytes, paths)

    @abc.abstractmethod
    def argv(self, workdir: Path, size_bytes: int, paths: BenchPaths) -> list[str]:
        """The server's command line."""

    def environment(self) -> dict[str, str]:
        """Variables added to the server's environment."""
        return {}

    def uri(self, paths: BenchPaths) -> str:
        return f"nbd+unix:///{self.export_name}?socket={paths.socket}"


class NbdkitMemory(Server):
    name = "mem"
    description = "nbdkit memory plugin (transport ceiling)"

    def argv(self, workdir, size_bytes, paths):
        return ["/usr/bin/nbdkit", "-f", "-U", str(paths.socket), "memory", format_size(size_bytes)]


class NbdkitFile(Server):
    name = "file"
    description = "nbdkit file plugin on a raw file"

    def setup(self, workdir, size_bytes, paths):
        with open(workdir / "export.raw", "wb") as image:
            image.truncate(size_bytes)
        return Prepared(commands=[f"truncate -s {format_size(size_bytes)} {workdir / 'export.raw'}"])

    def argv(self, workdir, size_bytes, paths):
        return ["/usr/bin/nbdkit", "-f", "-U", str(paths.socket), "file", f"file={workdir / 'export.raw'}"]


class QemuQcow2(Server):
    name = "qcow2"
    description = "qemu-nbd, qcow2"
    export_name = ""

    def setup(self, workdir, size_bytes, paths):
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", str(workdir / "export.qcow2"), str(size_bytes)]
        run_checked(argv)
        return Prepared(commands=[quote(argv)])

    def argv(self, workdir, size_bytes, paths):
        return ["/usr/bin/qemu-nbd", "-k", str(paths.socket), "-f", "qcow2", "-t", "--cache=writeback",
                "--aio=threads", str(workdir / "export.qcow2")]


class QemuQcow2Zstd(QemuQcow2):
    name = "qcow2zstd"
    description = "qemu-nbd, qcow2 compression_type=zstd, prefilled compressed by qemu-img convert -c"
    prefilled_by_setup = True

    def setup(self, workdir, size_bytes, paths):
        source = data_image(paths.scratch, size_bytes, paths.compress_percent)
        argv = ["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
                str(source), str(workdir / "export.qcow2")]
        os.sync()
        completed = run_checked(argv)
        image_bytes = (workdir / "export.qcow2").stat().st_size
        prefill = {"tool": "qemu-img convert -c", "seconds": completed.wall_seconds,
                   "mbps": size_bytes / completed.wall_seconds / 1e6, "image_bytes": image_bytes,
                   "command": quote(argv)}
        return Prepared(commands=[quote(argv)], prefill=prefill)

    def setup_blank(self, workdir, size_bytes, paths):
        """An empty zstd qcow2: qemu-nbd writes its clusters uncompressed, so for writes into a
        fresh export this is qcow2 again (kept so that every server has every column)."""
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd",
                str(workdir / "export.qcow2"), str(size_bytes)]
        run_checked(argv)
        return Prepared(commands=[quote(argv)])


class PythonMemory(Server):
    name = "pymem"
    description = "nbdkit Python plugin, bytearray, serialize_all_requests (Python ceiling)"
    thread_model = "serialize_all_requests"

    def argv(self, workdir, size_bytes, paths):
        plugin = paths.repo_root / "tools" / "bench" / "plugins" / "pymem.py"
        return ["/usr/bin/nbdkit", "-f", "-U", str(paths.socket), "python", str(plugin),
                f"size={size_bytes}", f"thread_model={self.thread_model}"]


class PythonMemoryParallel(PythonMemory):
    name = "pymem-parallel"
    description = "nbdkit Python plugin, bytearray, parallel thread model"
    thread_model = "parallel"


class Chunkvol(Server):
    """chunkvol as `make run` serves it: a pool, one volume, nbdkit with the Python plugin.

    ``plugin_args`` are extra ``key=value`` words for nbdkit (``--chunkvol-arg``), so
    variants such as ``thread_model=serialize`` can be compared in one run.
    """

    is_chunkvol = True
    chunk_size = "1G"

    def __init__(self, name: str, compression: str, plugin_args: list[str], pure: bool = False,
                 tree: Path | None = None):
        self.name = name
        self.compression = compression
        self.plugin_args = list(plugin_args)
        self.pure = pure
        self.tree = tree  # another checkout's plugin (and the chunkvol package beside it): A/B in one run
        extra = f", {' '.join(plugin_args)}" if plugin_args else ""
        self.description = f"chunkvol, compression {compression}{extra}" + (
            ", pure Python (CHUNKVOL_PURE=1: no compiled hot path)" if pure else "") + (
            f", the plugin of {tree}" if tree else "")

    def environment(self) -> dict[str, str]:
        return {"CHUNKVOL_PURE": "1"} if self.pure else {}

    def plugin_path(self, paths: BenchPaths) -> Path:
        # The plugin puts its own checkout first on sys.path, so it serves that tree's chunkvol.
        return (self.tree or paths.repo_root) / "nbdkit_plugin" / "chunkvol_plugin.py"

    def cli(self, paths: BenchPaths) -> Path:
        return paths.venv_bin / "chunkvol"

    def check_available(self, paths):
        for needed in (self.plugin_path(paths), self.cli(paths)):
            if not needed.exists():
                raise SetupFailed(f"{needed.relative_to(paths.repo_root)} does not exist (yet)")

    def pool(self, workdir: Path) -> Path:
        return workdir / "pool"

    def setup(self, workdir, size_bytes, paths):
        self.check_available(paths)
        pool = self.pool(workdir)
        commands = [
            [str(self.cli(paths)), "--pool", str(pool), "init", "--chunk-size", self.chunk_size],
            [str(self.cli(paths)), "--pool", str(pool), "volume", "create", self.export_name,
             "--size", format_size(size_bytes), "--compression", self.compression],
        ]
        for argv in commands:
            try:
                run_checked(argv, cwd=str(paths.repo_root))
            except CommandFailed as error:
                raise SetupFailed(str(error)) from error
        return Prepared(commands=[quote(argv) for argv in commands])

    def argv(self, workdir, size_bytes, paths):
        return ["/usr/bin/nbdkit", "-f", "-U", str(paths.socket), "python", str(self.plugin_path(paths)),
                f"pool={self.pool(workdir)}", *self.plugin_args]


def anchor_servers() -> list[Server]:
    return [NbdkitMemory(), NbdkitFile(), QemuQcow2(), QemuQcow2Zstd(), PythonMemory(), PythonMemoryParallel()]


class NotServing(Exception):
    """The server accepted no connection, or no read, yet."""


PROBE_POLL_MILLISECONDS = 100


def read_first_block(socket_path: Path, export_name: str) -> None:
    """Connect and read 4 KiB at offset 0; raise NotServing if the server cannot serve yet.

    Uses libnbd's asynchronous calls and polls in 100 ms steps, because a blocking connect
    to a server that is still opening its store sits in C until the server answers, where
    neither Ctrl-C nor SIGTERM reaches the harness.
    """
    handle = nbd.NBD()
    try:
        handle.set_export_name(export_name)
        handle.aio_connect_unix(str(socket_path))
        while handle.aio_is_connecting():
            handle.poll(PROBE_POLL_MILLISECONDS)
        if not handle.aio_is_ready():
            raise NotServing("handshake did not complete")
        buffer = nbd.Buffer(min(4096, handle.get_size()))
        cookie = handle.aio_pread(buffer, 0)
        while not handle.aio_command_completed(cookie):
            handle.poll(PROBE_POLL_MILLISECONDS)
        handle.shutdown()
    except nbd.Error as error:
        raise NotServing(str(error)) from error


_running: dict[int, "RunningServer"] = {}


class RunningServer:
    """A started server process: readiness, /proc counters, and a stop by PID."""

    def __init__(self, server: Server, argv: list[str], paths: BenchPaths, log_path: Path):
        self.server = server
        self.argv = argv
        self.paths = paths
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.peak_rss_bytes = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> None:
        self.paths.socket.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.started_at = time.perf_counter()
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            env={**tool_environment(), **self.server.environment()},
                                            cwd=str(self.paths.repo_root),
                                            start_new_session=True)
        _running[self.process.pid] = self

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, limit_seconds: float) -> float:
        """Seconds from start until a 4 KiB read at offset 0 succeeds.

        Polls every 5 ms. Raises SetupFailed if the server exits first or is still not
        serving after ``limit_seconds`` (a guard against a hung server, not a measurement).
        """
        last_error = "no socket yet"
        while True:
            if not self.alive():
                raise SetupFailed(f"{self.argv[0]} exited with {self.process.returncode} before serving: "
                                  f"{self.log_tail()}")
            if self.paths.socket.exists():
                try:
                    read_first_block(self.paths.socket, self.server.export_name)
                    return time.perf_counter() - self.started_at
                except NotServing as error:
                    last_error = str(error)
            if time.perf_counter() - self.started_at > limit_seconds:
                raise SetupFailed(f"not serving after {limit_seconds:.0f} s ({last_error}): {self.log_tail()}")
            time.sleep(READY_POLL_SECONDS)

    def cpu_seconds(self) -> float:
        return procstat.cpu_seconds(self.pid) if self.alive() else 0.0

    def sample_peak_rss(self) -> int:
        """Peak RSS so far (VmHWM never goes down, so the last sample before stop is the peak)."""
        if self.alive():
            self.peak_rss_bytes = max(self.peak_rss_bytes, procstat.peak_rss_bytes(self.pid))
        return self.peak_rss_bytes

    def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> dict:
        """SIGTERM, wait for the exit (the clean stop), SIGKILL after ``grace_seconds``."""
        if self.process is None:
            return {}
        self.sample_peak_rss()
        start = time.perf_counter()
        killed = False
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
                killed = True
        _running.pop(self.process.pid, None)
        self.paths.socket.unlink(missing_ok=True)
        return {"stop_seconds": time.perf_counter() - start, "exit_code": self.process.returncode,
                "killed": killed}


def stop_all() -> None:
    """Stop every server this process started and has not stopped yet (exit paths)."""
    for running in list(_running.values()):
        try:
            running.stop(grace_seconds=60.0)
        except (ProcessLookupError, OSError):
            _running.pop(running.pid, None)


def fresh_workdir(run_dir: Path, name: str) -> Path:
    """An empty folder for one server lifecycle (removed again by ``remove_workdir``)."""
    workdir = run_dir / name
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return workdir


def remove_workdir(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
