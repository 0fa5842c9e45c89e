"""`make bench`: chunkvol against its anchors, on the same disk, in one run.

    .venv/bin/python tools/bench/run.py [--quick] [--reps N] [--servers a,b] [--workloads x,y]
        [--scratch DIR] [--sustained-size 6G] [--chunkvol-arg KEY=VALUE ...] [--chunkvol-variant NAME:KEY=VALUE,...]
    BENCH_ARGS="--quick" make bench      # the same options through make

For every repetition, for every server in turn (interleaved, so a slow minute of the shared
host hits every server a little instead of one server a lot):

1. ``copy``: a fresh server with an export the size of the nbdcopy image; nbdcopy the image
   in, then out to a file; compare.
2. ``io``: a fresh server with the full export; prefill it (fio seq 1 MiB QD8 over the whole
   export; qcow2zstd is prefilled compressed by ``qemu-img convert -c`` instead); then each
   workload (see workloads.py), each after a ``sync``, with the server's CPU time read from
   /proc around it and its peak RSS read before the stop.
3. ``sustained``: a fresh server with an empty export of ``--sustained-size`` (no prefill);
   after a ``sync`` (caches are not dropped), fio writes it once sequentially (1 MiB QD8) and
   flushes at the end (``--end_fsync=1``); MB/s counts until that flush returns.

Then, for chunkvol servers, the pool-open times (openpool.py). Results: SCRATCH/results-
<timestamp>.md and .json, and the Markdown on stdout. A server whose setup or start fails is
skipped with a line saying why; the others go on. Servers are stopped by PID on every exit
path, Ctrl-C included (the partial results are still written).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import machine
import procstat
import report
from commands import CommandFailed, quote
from datagen import data_image
from openpool import OpenTimer, measure_open_times
from servers import (BenchPaths, Chunkvol, RunningServer, Server, SetupFailed, anchor_servers, fresh_workdir,
                     remove_workdir, stop_all)
from sizes import parse_size
from workloads import (WORKLOADS, WORKLOADS_BY_NAME, Timing, run_copy_in, run_copy_out, run_prefill, run_sustained,
                       run_workload, same_content, workload_argv)

REPO_ROOT = Path(__file__).resolve().parents[2]
FLUSH_WORKLOAD = "randwrite_4k_qd16_flush32"
SPECIAL_WORKLOADS = ["copy", "open"]
MAX_SOCKET_PATH_BYTES = 100

FULL = {"size": "4G", "copy_size": "2G", "open_log_size": "10G", "sustained_size": "6G", "runtime": 8.0, "ramp": 1.0,
        "reps": 3, "quiet_wait": 30.0, "quiet_budget": 900.0, "ready_timeout": 3600.0}
QUICK = {"size": "512M", "copy_size": "256M", "open_log_size": "256M", "sustained_size": "512M", "runtime": 2.0,
         "ramp": 1.0, "reps": 1, "quiet_wait": 10.0, "quiet_budget": 60.0, "ready_timeout": 300.0}


def say(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the final report."""
    print(message, file=sys.stderr, flush=True)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", default=str(REPO_ROOT / "var" / "bench"),
                        help="folder for stores, images and results, on the disk to measure (default ./var/bench)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['size']} export, {QUICK['runtime']:.0f} s runs, 1 repetition")
    parser.add_argument("--reps", type=int, help="repetitions per server and workload (default 3; --quick 1)")
    parser.add_argument("--runtime", type=float, help="measured seconds per workload (default 8; --quick 2)")
    parser.add_argument("--ramp", type=float, help="uncounted seconds before each measurement (default 1)")
    parser.add_argument("--size", help="export size (default 4G; --quick 512M)")
    parser.add_argument("--copy-size", help="nbdcopy image size (default 2G; --quick 256M)")
    parser.add_argument("--open-log-size", help="log written before the pool-open test (default 10G; --quick 256M)")
    parser.add_argument("--sustained-size", help="fresh export written once, then flushed, by the sustained "
                                                 "sequential write (default 6G; --quick 512M)")
    parser.add_argument("--servers", help="comma-separated server names (default: all; see --list)")
    parser.add_argument("--workloads", help="comma-separated workload names, plus 'copy' and 'open' (default: all "
                                            "default ones; see --list)")
    parser.add_argument("--chunkvol-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra nbdkit plugin key for every chunkvol server (repeatable)")
    parser.add_argument("--chunkvol-variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="an extra chunkvol server 'chunkvol-NAME'; key 'compression' goes to volume create, "
                             "pure=1 serves without the compiled hot path (CHUNKVOL_PURE=1), tree=DIR serves another "
                             "checkout's plugin and package (A/B of two commits in one run), "
                             "the others go to nbdkit (e.g. ser:compression=none,thread_model=serialize)")
    parser.add_argument("--compress-percent", type=int, default=50,
                        help="how compressible written data is, in %% (fio buffer_compress_percentage; 0 = random)")
    parser.add_argument("--fixed-fio", help="a fio without the fsync-storm bug (>= 3.38, or 3.33 + 673159e6) to use "
                                            "for the flush workload instead of nbdload")
    parser.add_argument("--ready-timeout", type=float,
                        help="give up on a server that does not serve after this many seconds "
                             "(default 3600; --quick 300)")
    parser.add_argument("--quiet-wait", type=float,
                        help="before each measurement, wait up to this many seconds for other processes to use "
                             "less than --quiet-threshold of a core (default 30; --quick 10; 0: do not wait)")
    parser.add_argument("--quiet-budget", type=float,
                        help="at most this many seconds of such waiting in the whole run (default 900; --quick 60)")
    parser.add_argument("--quiet-threshold", type=float, default=10.0,
                        help="%% of one core that other processes may use when a measurement starts (default 10)")
    parser.add_argument("--list", action="store_true", help="list servers and workloads, then exit")
    arguments = parser.parse_args(argv)
    defaults = QUICK if arguments.quick else FULL
    for key in ("size", "copy_size", "open_log_size", "sustained_size", "runtime", "ramp", "reps", "quiet_wait",
                "quiet_budget", "ready_timeout"):
        if getattr(arguments, key) is None:
            setattr(arguments, key, defaults[key])
    return arguments


def chunkvol_servers(arguments: argparse.Namespace) -> list[Server]:
    servers = [Chunkvol("chunkvol-none", "none", arguments.chunkvol_arg),
               Chunkvol("chunkvol-zstd", "zstd", arguments.chunkvol_arg),
               Chunkvol("chunkvol-direct", "none", arguments.chunkvol_arg + ["cache=none"])]
    for variant in arguments.chunkvol_variant:
        name, _, keys = variant.partition(":")
        settings = dict(pair.split("=", 1) for pair in keys.split(",") if pair)
        compression = settings.pop("compression", "none")
        pure = settings.pop("pure", "0") == "1"
        tree = settings.pop("tree", None)
        plugin_args = arguments.chunkvol_arg + [f"{key}={value}" for key, value in settings.items()]
        servers.append(Chunkvol(f"chunkvol-{name}", compression, plugin_args, pure=pure,
                                tree=Path(tree).resolve() if tree else None))
    return servers


def select(names: str | None, known: list[str], default: list[str], what: str) -> list[str]:
    if not names:
        return default
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return chosen


def socket_path(run_dir: Path) -> Path:
    """RUN_DIR/nbd.sock, or a short path under /tmp if that is too long for a Unix socket."""
    candidate = run_dir / "nbd.sock"
    if len(str(candidate).encode()) <= MAX_SOCKET_PATH_BYTES:
        return candidate
    return Path(tempfile.mkdtemp(prefix="cvbench-")) / "nbd.sock"


class ScratchLock:
    """One benchmark at a time per scratch folder (and, in practice, per machine).

    Two runs at once on two cores measure each other, and would share image files; the
    second one stops at once and names the first one's PID.
    """

    def __init__(self, scratch: Path):
        self.path = scratch / "bench.lock"
        self.file = None

    def __enter__(self) -> "ScratchLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise SystemExit(f"another benchmark (pid {holder}) is using {self.path.parent}; "
                             "wait for it or pass another --scratch")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exception) -> None:
        self.file.close()


class Bench:
    """One benchmark run: the plan, the loop over repetitions and servers, the records."""

    def __init__(self, arguments: argparse.Namespace, servers: list[Server], workloads: list[str]):
        self.arguments = arguments
        self.servers = servers
        chosen = [WORKLOADS_BY_NAME[name] for name in workloads if name in WORKLOADS_BY_NAME]
        self.io_workloads = [workload for workload in chosen if not workload.sustained]
        self.sustained_workloads = [workload for workload in chosen if workload.sustained]
        self.do_copy = "copy" in workloads
        self.do_open = "open" in workloads
        self.size_bytes = parse_size(arguments.size)
        self.copy_bytes = parse_size(arguments.copy_size)
        self.open_log_bytes = parse_size(arguments.open_log_size)
        self.sustained_bytes = parse_size(arguments.sustained_size)
        self.timing = Timing(ramp_seconds=arguments.ramp, runtime_seconds=arguments.runtime)
        scratch = Path(arguments.scratch).resolve()
        run_dir = scratch / f"run-{os.getpid()}"
        self.paths = BenchPaths(repo_root=REPO_ROOT, scratch=scratch, run_dir=run_dir, socket=socket_path(run_dir),
                                venv_bin=Path(sys.executable).parent, compress_percent=arguments.compress_percent)
        self.log_dir = scratch / "logs"
        self.records: list[dict] = []
        self.lifecycles: list[dict] = []
        self.open_times: list[dict] = []
        self.skipped: dict[str, str] = {}
        self.quiet_budget_left = arguments.quiet_budget

    @property
    def flush_client(self) -> str:
        if self.arguments.fixed_fio:
            return f"fio (user-supplied fixed build: {self.arguments.fixed_fio})"
        return "nbdload (tools/bench/nbdload.py, libnbd, Python)"

    def skip(self, server: Server, reason: str) -> None:
        reason = " / ".join(reason.strip().splitlines())
        self.skipped[server.name] = reason
        say(f"SKIP {server.name}: {reason}")

    def run(self) -> None:
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for server in self.servers:
            try:
                server.check_available(self.paths)
            except SetupFailed as error:
                self.skip(server, str(error))
        for rep in range(self.arguments.reps):
            for server in self.servers:
                if server.name in self.skipped:
                    continue
                if self.do_copy:
                    self.lifecycle(server, rep, "copy", self.copy_bytes, self.copy_phase)
                if self.io_workloads and server.name not in self.skipped:
                    self.lifecycle(server, rep, "io", self.size_bytes, self.io_phase)
                if self.sustained_workloads and server.name not in self.skipped:
                    self.lifecycle(server, rep, "sustained", self.sustained_bytes, self.sustained_phase, blank=True)
        if self.do_open:
            self.open_phase()

    def lifecycle(self, server: Server, rep: int, phase: str, size_bytes: int, body, blank: bool = False) -> None:
        """Set up a fresh store (never prefilled if ``blank``), start the server, run ``body``, stop it by
        PID, remove the store."""
        say(f"rep {rep + 1}/{self.arguments.reps} {server.name} ({phase}): setting up")
        workdir = fresh_workdir(self.paths.run_dir, server.name)
        entry = {"rep": rep, "server": server.name, "phase": phase, "description": server.description,
                 "size_bytes": size_bytes}
        running = None
        try:
            prepared = (server.setup_blank if blank else server.setup)(workdir, size_bytes, self.paths)
            entry["setup_commands"] = prepared.commands
            argv = server.argv(workdir, size_bytes, self.paths)
            entry["command"] = quote(argv)
            running = RunningServer(server, argv, self.paths, self.log_dir / f"rep{rep}-{server.name}-{phase}.log")
            running.start()
            entry["ready_seconds"] = running.wait_ready(self.arguments.ready_timeout)
            body(server, running, rep, prepared)
        except SetupFailed as error:
            self.skip(server, str(error))
        except CommandFailed as error:
            self.skip(server, f"setup command failed: {error}")
        finally:
            if running is not None:
                entry["peak_rss_bytes"] = running.sample_peak_rss()
                entry.update(running.stop())
            self.lifecycles.append(entry)
            remove_workdir(workdir)

    def wait_for_quiet(self) -> dict:
        """Wait (up to --quiet-wait s, --quiet-budget s in all) until others use < --quiet-threshold % of a core.

        This VM is shared: other people's test suites and VMs can take a whole core, and
        every figure here is CPU-bound on two cores. Waiting is better than mixing disturbed
        runs into the medians; the wait and the last sample are recorded either way.
        """
        start = time.perf_counter()
        limit = min(self.arguments.quiet_wait, self.quiet_budget_left)
        others = None
        while limit > 0:
            others = procstat.others_cpu_percent(1.0)
            if others < self.arguments.quiet_threshold or time.perf_counter() - start >= limit:
                break
        waited = time.perf_counter() - start
        self.quiet_budget_left = max(0.0, self.quiet_budget_left - waited)
        if others is not None and others >= self.arguments.quiet_threshold:
            say(f"  (others still use {others:.0f} % of a core after {waited:.0f} s; measuring anyway)")
        return {"quiet_wait_seconds": waited, "others_before_percent": others}

    def measure(self, running: RunningServer, action) -> dict:
        """Run ``action`` after a sync, a quiet wait and a sync; add the server's and others' CPU over its wall time.

        The first sync writes back our own dirty pages (the kernel's writeback threads would
        otherwise count as other people's work during the quiet wait).
        """
        os.sync()
        quiet = self.wait_for_quiet()
        os.sync()
        if not running.alive():
            raise CommandFailed([running.argv[0]], running.process.returncode,
                                f"the server exited before the measurement: {running.log_tail()}")
        server_cpu_before = running.cpu_seconds()
        busy_before = procstat.machine_busy_seconds()
        start = time.perf_counter()
        result = action()
        wall_seconds = time.perf_counter() - start
        server_cpu = max(0.0, running.cpu_seconds() - server_cpu_before)  # 0 if the server died
        busy = procstat.machine_busy_seconds() - busy_before
        client_cpu = result.get("client_cpu_seconds", 0.0)
        result["server_cpu_seconds"] = server_cpu
        result["server_cpu_percent"] = 100.0 * server_cpu / wall_seconds
        if result.get("iops"):
            result["server_cpu_us_per_op"] = 1e6 * server_cpu / (result["iops"] * wall_seconds)
        result["other_cpu_percent"] = max(0.0, 100.0 * (busy - server_cpu - client_cpu) / wall_seconds)
        result.update(quiet)
        return result

    def record(self, rep: int, server: Server, workload: str, unit: str, result: dict, client: str) -> None:
        value = result.get("mbps") if unit == "MB/s" else result.get("iops")
        entry = {"rep": rep, "server": server.name, "workload": workload, "unit": unit, "value": value,
                 "client": client, **result}
        self.records.append(entry)
        extra = ""
        if "writes_per_flush" in result and result["writes_per_flush"]:
            extra = f", {result['writes_per_flush']:.1f} writes/flush"
        if "server_cpu_percent" in result:
            extra += f", server CPU {result['server_cpu_percent']:.0f} %"
        say(f"  {workload}: {value:,.0f} {unit}{extra}")

    def record_error(self, rep: int, server: Server, workload: str, error: Exception) -> None:
        message = " / ".join(str(error).strip().splitlines())
        self.records.append({"rep": rep, "server": server.name, "workload": workload, "error": message})
        say(f"  {workload}: FAILED: {message}")

    def copy_phase(self, server: Server, running: RunningServer, rep: int, prepared) -> None:
        """nbdcopy the image in, then out, then compare (see workloads.run_copy_in)."""
        image = data_image(self.paths.scratch, self.copy_bytes, self.arguments.compress_percent)
        out_path = self.paths.scratch / "copy-out.raw"
        uri = server.uri(self.paths)
        try:
            self.record(rep, server, "copy_in", "MB/s", self.measure(running, lambda: run_copy_in(image, uri)),
                        "nbdcopy")
            self.record(rep, server, "copy_out", "MB/s",
                        self.measure(running, lambda: run_copy_out(uri, out_path, self.copy_bytes)), "nbdcopy")
            if not same_content(image, out_path):
                self.record_error(rep, server, "copy_verify", RuntimeError("data copied out differs from the image"))
        except CommandFailed as error:
            self.record_error(rep, server, "copy", error)
        finally:
            out_path.unlink(missing_ok=True)

    def io_phase(self, server: Server, running: RunningServer, rep: int, prepared) -> None:
        uri = server.uri(self.paths)
        if server.prefilled_by_setup and prepared.prefill:
            self.record(rep, server, "prefill", "MB/s", prepared.prefill, prepared.prefill["tool"])
        else:
            try:
                self.record(rep, server, "prefill", "MB/s",
                            self.measure(running, lambda: run_prefill(uri, self.size_bytes,
                                                                      self.arguments.compress_percent)), "fio")
            except CommandFailed as error:
                self.record_error(rep, server, "prefill", error)
                return
        for workload in self.io_workloads:
            argv, client = workload_argv(workload, uri, self.size_bytes, self.timing, self.arguments.compress_percent,
                                         self.arguments.fixed_fio)
            if not self.measure_workload(rep, server, running, workload, client, lambda: run_workload(argv)):
                return

    def measure_workload(self, rep: int, server: Server, running: RunningServer, workload, client: str,
                         action) -> bool:
        """Measure and record one workload; False when the server died under it."""
        try:
            result = self.measure(running, action)
            if workload.sustained and result.get("write_ops"):
                # Per request exactly: every write was counted (no ramp), and the server did nothing
                # during fio's start-up that the IOPS x wall-time estimate would spread over it.
                result["server_cpu_us_per_op"] = 1e6 * result["server_cpu_seconds"] / result["write_ops"]
            self.record(rep, server, workload.name, workload.unit, result, client)
        except CommandFailed as error:
            self.record_error(rep, server, workload.name, error)
        if not running.alive():
            self.record_error(rep, server, "server", RuntimeError(
                f"server exited with {running.process.returncode}: {running.log_tail()}"))
            return False
        return True

    def sustained_phase(self, server: Server, running: RunningServer, rep: int, prepared) -> None:
        """Write the fresh export once, sequentially, and flush; counted until the flush returns.

        ``measure`` syncs first (so no server starts with dirty pages, its own or the previous
        server's) and drops no caches.
        """
        uri = server.uri(self.paths)
        for workload in self.sustained_workloads:
            argv, client = workload_argv(workload, uri, self.sustained_bytes, self.timing,
                                         self.arguments.compress_percent, self.arguments.fixed_fio)
            if not self.measure_workload(rep, server, running, workload, client,
                                         lambda: run_sustained(argv, self.sustained_bytes)):
                return

    def open_phase(self) -> None:
        chunkvols = [server for server in self.servers if server.is_chunkvol and server.name not in self.skipped]
        if not chunkvols:
            return
        timer = OpenTimer(self.paths, self.log_dir, self.arguments.ready_timeout, before_start=self.wait_for_quiet)
        say("pool open times: floor (pymem start to first read)")
        try:
            self.open_times.append({"server": "floor", **timer.floor()})
        except SetupFailed as error:
            say(f"  floor failed: {error}")
        for server in chunkvols:
            say(f"pool open times: {server.name}")
            entry = measure_open_times(server, timer, self.size_bytes, self.open_log_bytes, self.arguments.reps,
                                       self.arguments.compress_percent, say)
            if "error" in entry:
                say(f"  {server.name}: FAILED: {entry['error']}")
            self.open_times.append(entry)

    def workload_columns(self) -> list[tuple[str, str, str]]:
        columns = [("prefill", "prefill", "MB/s")] if self.io_workloads else []
        chosen = self.io_workloads + self.sustained_workloads
        columns += [(workload.name, workload.label, workload.unit) for workload in WORKLOADS if workload in chosen]
        if self.do_copy:
            columns += [("copy_in", "nbdcopy in", "MB/s"), ("copy_out", "nbdcopy out", "MB/s")]
        return columns

    def write_results(self, interrupted: bool) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        meta = {
            "command": quote([sys.executable, *sys.argv]),
            "machine": machine.describe(self.paths.scratch),
            "flush_client": self.flush_client,
            "interrupted": interrupted,
            "settings": {"size": self.arguments.size, "copy_size": self.arguments.copy_size,
                         "open_log_size": self.arguments.open_log_size,
                         "sustained_size": self.arguments.sustained_size, "reps": self.arguments.reps,
                         "runtime_seconds": self.timing.runtime_seconds, "ramp_seconds": self.timing.ramp_seconds,
                         "compress_percent": self.arguments.compress_percent, "quick": self.arguments.quick,
                         "servers": [server.name for server in self.servers],
                         "workloads": [column[0] for column in self.workload_columns()],
                         "chunkvol_args": self.arguments.chunkvol_arg, "scratch": str(self.paths.scratch)},
        }
        summary = report.Summary(self.records, [server.name for server in self.servers], self.workload_columns())
        chunkvol_names = [server.name for server in self.servers if server.is_chunkvol]
        markdown = report.render_markdown(meta, summary, self.lifecycles, self.open_times, self.skipped,
                                          chunkvol_names, FLUSH_WORKLOAD,
                                          [workload.name for workload in self.sustained_workloads])
        document = {"meta": meta, "summary": summary.as_json(), "ratios": summary.ratios(
                        [name for name in chunkvol_names if name in summary.servers_with_data()]),
                    "records": self.records, "lifecycles": self.lifecycles, "open_times": self.open_times,
                    "skipped": self.skipped}
        base = self.paths.scratch / f"results-{stamp}"
        base.with_suffix(".md").write_text(markdown)
        base.with_suffix(".json").write_text(json.dumps(document, indent=1, default=str) + "\n")
        print(markdown)
        say(f"results: {base}.md and {base}.json")
        return base


def _raise_keyboard_interrupt(signal_number, frame):
    raise KeyboardInterrupt(f"signal {signal_number}")


def main(argv: list[str]) -> int:
    # `make bench` passes no arguments; BENCH_ARGS="--quick ..." make bench reaches here.
    arguments = parse_arguments(shlex.split(os.environ.get("BENCH_ARGS", "")) + argv)
    all_servers = anchor_servers() + chunkvol_servers(arguments)
    server_names = [server.name for server in all_servers]
    default_workloads = [workload.name for workload in WORKLOADS if workload.default] + SPECIAL_WORKLOADS
    known_workloads = [workload.name for workload in WORKLOADS] + SPECIAL_WORKLOADS
    if arguments.list:
        for server in all_servers:
            print(f"server   {server.name:<34} {server.description}")
        for workload in WORKLOADS:
            note = f" (own fresh export of --sustained-size, {arguments.sustained_size})" if workload.sustained else ""
            print(f"workload {workload.name:<34} {workload.label}{note}{'' if workload.default else ' (not default)'}")
        print(f"workload {'copy':<34} nbdcopy image in and out")
        print(f"workload {'open':<34} chunkvol pool open time (checkpointed, rebuild)")
        return 0
    chosen_servers = select(arguments.servers, server_names, server_names, "server")
    servers = [server for server in all_servers if server.name in chosen_servers]
    workloads = select(arguments.workloads, known_workloads, default_workloads, "workload")
    bench = Bench(arguments, servers, workloads)
    # A shell without job control starts background jobs with SIGINT ignored; a benchmark that
    # cannot be interrupted leaves servers behind, so take SIGINT back, and treat SIGTERM alike.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    with ScratchLock(bench.paths.scratch):
        exit_code = 0
        try:
            bench.run()
        except KeyboardInterrupt:
            exit_code = 130
            say("interrupted: stopping servers, writing partial results")
        except Exception:
            exit_code = 1
            traceback.print_exc()
            say("harness error: stopping servers, writing partial results")
        finally:
            stop_all()
            remove_workdir(bench.paths.run_dir)
        bench.write_results(interrupted=exit_code != 0)
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
