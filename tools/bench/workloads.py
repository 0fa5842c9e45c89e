"""The workloads: what each sends, which client sends it, and how its output is read.

Why these: sequential 1 MiB at QD8 is the bulk path (copying images, streaming); random
4 KiB at QD16 is the small-I/O path that a log-structured store turns into appends (writes)
and block-map lookups (reads); the flush-every-32 variant adds the durability path
(FLUSH -> fdatasync + commit record); 70/30 random 16 KiB is a database-like mix. They run
in this order after a prefill of the whole export, so every read hits written data, and the
random reads come after the random writes have scattered the data (the realistic state of a
log-structured store).

Clients:

- fio 3.33 with ``ioengine=nbd`` for everything except flushes.
- ``nbdload.py`` (libnbd, Python) for the flush workload, because Debian's fio 3.33 sends a
  flush storm instead of one flush per 32 writes at iodepth > 1 (fixed in fio 3.38,
  commit 673159e6). ``--fixed-fio PATH`` swaps fio back in for it when one is at hand.

Every workload runs time based (``ramp`` seconds not counted, then ``runtime`` seconds),
except the prefill, which writes the whole export once, and the sustained sequential write.

The sustained write (``seqwrite_sustained_1M_qd8``) is the burst ``seqwrite_1M_qd8`` judged
again the way a bulk copy sees it: a fresh, empty export of ``--sustained-size`` (6 GiB by
default, no prefill), written once sequentially with 1 MiB QD8 writes and ``--end_fsync=1``,
counted until that final flush returns. A burst of a few seconds lands in the page cache of
a store that overwrites cached pages (file, qcow2); several GiB plus a flush make every store
put its data on the disk within the time counted. fio's nbd engine sends the end fsync as
one NBD FLUSH, and fio 3.33 counts the time until it completes in the job's write runtime
(checked with nbdkit's stats filter and a plugin whose flush sleeps 3 s: one flush, and the
3 s are in ``write.runtime``; see docs/BENCH.md), so MB/s = bytes written / that runtime.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import procstat
from commands import Completed, CommandFailed, quote, run_measured

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    unit: str  # "MB/s" or "IOPS": the headline figure
    rw: str  # fio's rw= value
    block_size: str
    iodepth: int
    flush_every: int = 0
    rwmixread: int = 0
    client: str = "fio"  # "fio", "nbdload" or "fio-stock-fsync"
    default: bool = True
    # Runs on a fresh, empty export of --sustained-size of its own (one lifecycle per server
    # and repetition, like copy), writing it once and flushing at the end: not time based.
    sustained: bool = False


WORKLOADS = [
    Workload("seqwrite_1M_qd8", "seq write 1 MiB QD8", "MB/s", "write", "1M", 8),
    Workload("seqwrite_sustained_1M_qd8", "seq write 1 MiB QD8, sustained + end flush", "MB/s",
             "write", "1M", 8, sustained=True),
    Workload("seqread_1M_qd8", "seq read 1 MiB QD8", "MB/s", "read", "1M", 8),
    Workload("randwrite_4k_qd16", "rand write 4 KiB QD16", "IOPS", "randwrite", "4k", 16),
    Workload("randwrite_4k_qd16_flush32", "rand write 4 KiB QD16 + flush/32", "IOPS", "randwrite", "4k", 16,
             flush_every=32, client="nbdload"),
    Workload("randread_4k_qd16", "rand read 4 KiB QD16", "IOPS", "randread", "4k", 16),
    Workload("randrw70_16k_qd16", "rand 70/30 read/write 16 KiB QD16", "IOPS", "randrw", "16k", 16,
             rwmixread=70),
    # Not run unless named in --workloads:
    Workload("randwrite_4k_qd16_nbdload", "rand write 4 KiB QD16 (nbdload, no flush)", "IOPS", "randwrite", "4k",
             16, client="nbdload", default=False),
    Workload("randwrite_4k_qd16_fsync32_stockfio", "rand write 4 KiB QD16 fsync=32 (stock fio 3.33: flush storm)",
             "IOPS", "randwrite", "4k", 16, flush_every=32, client="fio-stock-fsync", default=False),
]
WORKLOADS_BY_NAME = {workload.name: workload for workload in WORKLOADS}
BLOCK_SIZES_BYTES = {"1M": 1 << 20, "4k": 4096, "16k": 16384}


@dataclass(frozen=True)
class Timing:
    ramp_seconds: float
    runtime_seconds: float


def _fio_seconds(seconds: float) -> str:
    return f"{int(round(seconds * 1000))}ms"


def _data_options(compress_percent: int) -> list[str]:
    return [f"--buffer_compress_percentage={compress_percent}"] if compress_percent else []


def fio_argv(workload: Workload, uri: str, size_bytes: int, timing: Timing, compress_percent: int,
             fio_binary: str = "fio") -> list[str]:
    argv = [fio_binary, f"--name={workload.name}", "--ioengine=nbd", f"--uri={uri}", f"--size={size_bytes}",
            f"--rw={workload.rw}", f"--bs={workload.block_size}", f"--iodepth={workload.iodepth}",
            "--time_based", f"--runtime={_fio_seconds(timing.runtime_seconds)}",
            f"--ramp_time={_fio_seconds(timing.ramp_seconds)}", "--norandommap", "--output-format=json",
            *_data_options(compress_percent)]
    if workload.rwmixread:
        argv.append(f"--rwmixread={workload.rwmixread}")
    if workload.flush_every:
        argv.append(f"--fsync={workload.flush_every}")
    return argv


def nbdload_argv(workload: Workload, uri: str, timing: Timing, compress_percent: int) -> list[str]:
    argv = [sys.executable, str(HERE / "nbdload.py"), f"--uri={uri}", f"--rw={workload.rw}",
            f"--bs={BLOCK_SIZES_BYTES[workload.block_size]}", f"--iodepth={workload.iodepth}",
            f"--flush-every={workload.flush_every}", f"--ramp={timing.ramp_seconds}",
            f"--runtime={timing.runtime_seconds}", f"--compress-percent={compress_percent}"]
    if workload.rwmixread:
        argv.append(f"--rwmixread={workload.rwmixread}")
    return argv


def sustained_argv(workload: Workload, uri: str, size_bytes: int, compress_percent: int) -> list[str]:
    """The whole export once, sequentially, then one NBD FLUSH (fio's end_fsync); not time based."""
    return ["fio", f"--name={workload.name}", "--ioengine=nbd", f"--uri={uri}", f"--size={size_bytes}",
            f"--rw={workload.rw}", f"--bs={workload.block_size}", f"--iodepth={workload.iodepth}", "--end_fsync=1",
            "--output-format=json", *_data_options(compress_percent)]


def workload_argv(workload: Workload, uri: str, size_bytes: int, timing: Timing, compress_percent: int,
                  fixed_fio: str | None) -> tuple[list[str], str]:
    """The command for a workload and the name of the client that runs it."""
    if workload.sustained:
        return sustained_argv(workload, uri, size_bytes, compress_percent), "fio"
    if workload.client == "nbdload" and workload.flush_every and fixed_fio:
        return fio_argv(workload, uri, size_bytes, timing, compress_percent, fixed_fio), f"fio (fixed: {fixed_fio})"
    if workload.client == "nbdload":
        return nbdload_argv(workload, uri, timing, compress_percent), "nbdload (libnbd)"
    if workload.client == "fio-stock-fsync":
        return fio_argv(workload, uri, size_bytes, timing, compress_percent), "fio 3.33 (stock, flush storm)"
    return fio_argv(workload, uri, size_bytes, timing, compress_percent), "fio"


def _parse_json_output(completed: Completed) -> dict:
    """fio's nbd engine prints 'fio: connected to NBD server' before the JSON: skip to '{'."""
    text = completed.stdout
    if "{" not in text:
        raise CommandFailed(completed.argv, completed.returncode, completed.stderr + text)
    return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]


def _fio_result(data: dict) -> dict:
    job = data["jobs"][0]
    directions = {name: job[name] for name in ("read", "write") if job[name]["total_ios"] > 0}
    iops = sum(direction["iops"] for direction in directions.values())
    bytes_per_second = sum(direction["bw_bytes"] for direction in directions.values())
    result = {"iops": iops, "mbps": bytes_per_second / 1e6, "ops": sum(d["total_ios"] for d in directions.values()),
              "measured_seconds": job["job_runtime"] / 1000.0, "fio_error": job["error"]}
    for name, direction in directions.items():
        result[f"{name}_ops"] = direction["total_ios"]
        result[f"{name}_bytes"] = direction["io_bytes"]
        result[f"{name}_runtime_seconds"] = direction["runtime"] / 1000.0
        result[f"{name}_lat_mean_us"] = direction["clat_ns"]["mean"] / 1e3
        result[f"{name}_lat_p99_us"] = direction["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e3
    if directions:
        main = max(directions, key=lambda name: directions[name]["total_ios"])
        result["lat_mean_us"] = result[f"{main}_lat_mean_us"]
        result["lat_p99_us"] = result[f"{main}_lat_p99_us"]
    sync = job.get("sync", {})
    if sync.get("total_ios"):
        result["flushes"] = sync["total_ios"]
        result["writes_per_flush"] = job["write"]["total_ios"] / sync["total_ios"]
        result["flush_lat_mean_us"] = sync.get("lat_ns", {}).get("mean", 0) / 1e3
    return result


def _nbdload_result(data: dict) -> dict:
    result = {key: data[key] for key in ("iops", "mbps", "ops", "lat_mean_us", "lat_p99_us", "writes_per_flush")
              if key in data}
    result["measured_seconds"] = data["seconds"]
    result["flushes"] = data["counted"]["flush"]
    result["writes"] = data["counted"]["write"]
    for key, value in data.items():
        if key.endswith("_us"):
            result[key] = value
    return result


def run_workload(argv: list[str]) -> dict:
    """Run one workload command; return its figures plus the client's wall and CPU time."""
    completed = run_measured(argv)
    data = _parse_json_output(completed)
    completed.check()
    result = _nbdload_result(data) if data.get("tool") == "nbdload" else _fio_result(data)
    result.update(command=quote(argv), wall_seconds=completed.wall_seconds,
                  client_cpu_seconds=completed.cpu_seconds,
                  client_cpu_percent=100.0 * completed.cpu_seconds / completed.wall_seconds)
    return result


def prefill_argv(uri: str, size_bytes: int, compress_percent: int) -> list[str]:
    return ["fio", "--name=prefill", "--ioengine=nbd", f"--uri={uri}", f"--size={size_bytes}", "--rw=write",
            "--bs=1M", "--iodepth=8", "--output-format=json", *_data_options(compress_percent)]


def run_prefill(uri: str, size_bytes: int, compress_percent: int) -> dict:
    """Write the whole export once, sequentially, so that later reads hit written data."""
    result = run_workload(prefill_argv(uri, size_bytes, compress_percent))
    result["mbps"] = size_bytes / result["measured_seconds"] / 1e6 if result["measured_seconds"] else 0.0
    return result


def run_sustained(argv: list[str], size_bytes: int) -> dict:
    """Run the sustained write; MB/s = bytes / fio's write runtime, which includes the end flush.

    Also kept: the client's wall clock MB/s (fio start to exit, connection included) and the
    page cache before and after (/proc/meminfo): the harness syncs before the run and drops
    no caches, so every server starts with no dirty pages and whatever the kernel has cached.
    """
    cache_before = procstat.page_cache_bytes()
    result = run_workload(argv)
    cache_after = procstat.page_cache_bytes()
    written = result.get("write_bytes", 0)
    if written != size_bytes:
        raise CommandFailed(argv, 0, f"fio wrote {written} bytes, not the export's {size_bytes}")
    seconds = result["write_runtime_seconds"]
    result["mbps"] = size_bytes / seconds / 1e6 if seconds else 0.0
    result["measured_seconds"] = seconds
    result["wall_mbps"] = size_bytes / result["wall_seconds"] / 1e6
    result["bytes"] = size_bytes
    result.update({f"{key}_before_bytes": value for key, value in cache_before.items()})
    result.update({f"{key}_after_bytes": value for key, value in cache_after.items()})
    return result


def _copy(argv: list[str], image_bytes: int) -> dict:
    completed = run_measured(argv).check()
    return {"mbps": image_bytes / completed.wall_seconds / 1e6, "wall_seconds": completed.wall_seconds,
            "client_cpu_seconds": completed.cpu_seconds,
            "client_cpu_percent": 100.0 * completed.cpu_seconds / completed.wall_seconds, "command": quote(argv)}


def run_copy_in(image: Path, uri: str) -> dict:
    """nbdcopy an image file into the export, with nbdcopy's defaults (connections, requests)."""
    return _copy(["nbdcopy", str(image), uri], image.stat().st_size)


def run_copy_out(uri: str, out_path: Path, image_bytes: int) -> dict:
    """nbdcopy the export out to a file (the file is compared afterwards, untimed)."""
    out_path.unlink(missing_ok=True)
    return _copy(["nbdcopy", uri, str(out_path)], image_bytes)


def same_content(first: Path, second: Path) -> bool:
    """Byte-for-byte comparison: proves the store returned what it was given."""
    return run_measured(["cmp", "-s", str(first), str(second)]).returncode == 0
