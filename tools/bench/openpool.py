"""How long chunkvol takes to open a pool whose log holds N GiB of random 4 KiB writes.

Why: the block map is a derived cache. A clean stop checkpoints it, so the next open loads
the checkpoint and replays only the tail; after a crash or a lost index the whole log is
replayed. Both times decide how long a volume is unavailable after a restart, and they grow
with the log, not with the volume. Measured as the time from starting nbdkit to the first
successful 4 KiB NBD read (what a client waits for), polled every 5 ms.

Steps, per chunkvol server:

1. Fresh pool and volume (as in the throughput runs). Start nbdkit: ``empty`` open time.
2. fio writes ``log_bytes`` of random 4 KiB writes at QD16 (``--io_size``), then a clean
   stop (SIGTERM; the stop time includes the checkpoint).
3. ``reps`` times: start -> first read = ``checkpointed`` open; clean stop; delete
   POOL/index; start -> first read = ``rebuild`` open (MB/s = log bytes / time); clean stop
   (which checkpoints again, so the next checkpointed open is like the first).

For reference, the same start-to-first-read time of the pymem plugin (nbdkit + Python start,
no store at all) is measured as ``floor``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from commands import CommandFailed, quote
from servers import (BenchPaths, Chunkvol, PythonMemory, RunningServer, SetupFailed, fresh_workdir,
                     remove_workdir)
from workloads import run_workload

FLOOR_SIZE_BYTES = 64 << 20


def log_bytes_on_disk(pool: Path) -> int:
    """Bytes of all files in the pool except the index: the log the rebuild must read."""
    total = 0
    for directory, subdirectories, files in os.walk(pool):
        if Path(directory) == pool and "index" in subdirectories:
            subdirectories.remove("index")
        total += sum(os.stat(os.path.join(directory, name)).st_size for name in files)
    return total


def fill_argv(uri: str, volume_bytes: int, log_bytes: int, compress_percent: int) -> list[str]:
    argv = ["fio", "--name=logfill", "--ioengine=nbd", f"--uri={uri}", f"--size={volume_bytes}",
            "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--io_size={log_bytes}", "--norandommap",
            "--output-format=json"]
    if compress_percent:
        argv.append(f"--buffer_compress_percentage={compress_percent}")
    return argv


class OpenTimer:
    """Starts one server lifecycle after another and times start -> first read."""

    def __init__(self, paths: BenchPaths, log_dir: Path, ready_limit_seconds: float, before_start=None):
        self.paths = paths
        self.before_start = before_start or (lambda: None)
        self.log_dir = log_dir
        self.ready_limit_seconds = ready_limit_seconds

    def start(self, server, workdir: Path, size_bytes: int, label: str) -> tuple[RunningServer, float]:
        argv = server.argv(workdir, size_bytes, self.paths)
        running = RunningServer(server, argv, self.paths, self.log_dir / f"open-{server.name}-{label}.log")
        self.before_start()
        os.sync()
        running.start()
        try:
            return running, running.wait_ready(self.ready_limit_seconds)
        except BaseException:
            running.stop(grace_seconds=60.0)
            raise

    def floor(self) -> dict:
        server = PythonMemory()
        workdir = fresh_workdir(self.paths.run_dir, "open-floor")
        try:
            running, seconds = self.start(server, workdir, FLOOR_SIZE_BYTES, "floor")
            running.stop()
            return {"seconds": seconds, "command": quote(running.argv)}
        finally:
            remove_workdir(workdir)


def measure_open_times(server: Chunkvol, timer: OpenTimer, volume_bytes: int, log_bytes: int, reps: int,
                       compress_percent: int, say) -> dict:
    """Run steps 1-3 of the module docstring for one chunkvol server; return its figures."""
    paths = timer.paths
    workdir = fresh_workdir(paths.run_dir, f"open-{server.name}")
    result: dict = {"server": server.name, "log_bytes_written": log_bytes, "checkpointed": [], "rebuild": []}
    try:
        prepared = server.setup(workdir, volume_bytes, paths)
        result["setup_commands"] = prepared.commands
        running, result["empty_seconds"] = timer.start(server, workdir, volume_bytes, "empty")
        result["server_command"] = quote(running.argv)
        say(f"  {server.name}: filling the log with {log_bytes / 2**30:.2f} GiB of random 4 KiB writes")
        try:
            fill = run_workload(fill_argv(server.uri(paths), volume_bytes, log_bytes, compress_percent))
        finally:
            stop = running.stop()
        result["fill"] = {key: fill[key] for key in ("iops", "mbps", "measured_seconds", "command")}
        result["fill_stop_seconds"] = stop["stop_seconds"]
        pool = server.pool(workdir)
        index = pool / "index"
        result["log_bytes_on_disk"] = log_bytes_on_disk(pool)
        for rep in range(reps):
            running, seconds = timer.start(server, workdir, volume_bytes, f"checkpointed-{rep}")
            result["checkpointed"].append(seconds)
            running.stop()
            if not index.exists():
                result["rebuild_note"] = f"{index} does not exist after a clean stop: rebuild not measured"
                continue
            shutil.rmtree(index)
            running, seconds = timer.start(server, workdir, volume_bytes, f"rebuild-{rep}")
            result["rebuild"].append(seconds)
            running.stop()
            say(f"  {server.name} rep {rep}: checkpointed open {result['checkpointed'][-1]:.3f} s, "
                f"rebuild {seconds:.3f} s")
        result["rebuild_mbps"] = [result["log_bytes_on_disk"] / seconds / 1e6 for seconds in result["rebuild"]]
    except (SetupFailed, CommandFailed) as error:
        result["error"] = str(error)
    finally:
        remove_workdir(workdir)
    return result
