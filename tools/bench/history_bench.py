#!/usr/bin/env python3
"""History figures (`make bench-history`): snapshot create time, reading a snapshot taken
10,000 flush points ago against reading the live volume (fio over NBD, same server, same run),
compaction throughput and space reclaimed.

    .venv/bin/python tools/bench/history_bench.py [--size 1G] [--flushes 10000] [--runtime 8]

Writes a Markdown table to stdout and SCRATCH/history-<time>.json.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chunkvol import compaction, history  # noqa: E402
from chunkvol.cli.sizes import parse_size  # noqa: E402
from chunkvol.pool import Pool  # noqa: E402

CHUNKVOL = os.path.join(ROOT, ".venv", "bin", "chunkvol")
ENVIRONMENT = dict(os.environ, PATH="/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
MiB = 1 << 20


def fio(uri, rw, block_size, iodepth, size, runtime):
    argv = ["fio", "--name=h", "--ioengine=nbd", f"--uri={uri}", f"--size={size}", f"--rw={rw}",
            f"--bs={block_size}", f"--iodepth={iodepth}", "--time_based", f"--runtime={runtime}",
            "--ramp_time=1", "--norandommap", "--output-format=json", "--readonly"]
    output = subprocess.run(argv, capture_output=True, text=True, check=True, env=ENVIRONMENT).stdout
    job = json.loads(output[output.index("{"):])["jobs"][0]["read"]
    return {"iops": round(job["iops"]), "mbps": round(job["bw_bytes"] / 1e6, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", default=os.path.join(ROOT, "var", "bench"))
    parser.add_argument("--size", default="1G", help="volume size, written in full (default 1G)")
    parser.add_argument("--flushes", type=int, default=10_000, help="flush points after the snapshot")
    parser.add_argument("--snapshots", type=int, default=1000)
    parser.add_argument("--runtime", type=int, default=8, help="seconds per fio run")
    arguments = parser.parse_args()
    size = parse_size(arguments.size)
    work = os.path.join(arguments.scratch, f"history-{os.getpid()}")
    path = os.path.join(work, "pool")
    os.makedirs(work)
    results = {"size": size, "flushes": arguments.flushes, "snapshots": arguments.snapshots,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    server = None
    try:
        Pool.create(path, chunk_size=64 * MiB)
        rng = random.Random(1)
        with Pool.open(path) as pool:
            pool.create_volume("v", size)
            volume = pool.volume("v")
            block = bytearray(os.urandom(MiB))
            for offset in range(0, size, MiB):
                block[:8] = offset.to_bytes(8, "little")
                volume.write(block, offset)
            volume.flush()
            history.create_snapshot(pool, "v", "deep")
            started = time.monotonic()
            for number in range(arguments.flushes):
                volume.write(os.urandom(4096), rng.randrange(size // 4096) * 4096)
                volume.flush()
            results["flush_points_per_second"] = round(arguments.flushes / (time.monotonic() - started))
        socket_path = os.path.join(work, "nbd.sock")
        server = subprocess.Popen([CHUNKVOL, "--pool", path, "serve", "--socket", socket_path],
                                  env=ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(socket_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        reads = {}
        for export in ("v", "v@deep", "v", "v@deep"):  # interleaved, twice: the better of two
            uri = f"nbd+unix:///{export}?socket={socket_path}"
            for name, rw, block_size, depth in (("seqread_1M_qd8", "read", "1M", 8),
                                                 ("randread_4k_qd16", "randread", "4k", 16)):
                figure = fio(uri, rw, block_size, depth, size, arguments.runtime)
                key = (export, name)
                if key not in reads or figure["mbps"] > reads[key]["mbps"]:
                    reads[key] = figure
        results["reads"] = {f"{export} {name}": figure for (export, name), figure in reads.items()}
        for name in ("seqread_1M_qd8", "randread_4k_qd16"):
            results[f"snapshot_over_live_{name}"] = round(reads[("v@deep", name)]["mbps"] / reads[("v", name)]["mbps"], 3)
        points = [f"v@s{number}" for number in range(arguments.snapshots)]
        started = time.monotonic()
        subprocess.run([CHUNKVOL, "--pool", path, "snapshot", "create", *points], check=True,
                       env=ENVIRONMENT, stdout=subprocess.DEVNULL)
        results["snapshot_create_seconds_served"] = round(time.monotonic() - started, 2)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        server = None
        with Pool.open(path) as pool:
            started = time.monotonic()
            for number in range(arguments.snapshots):
                history.create_snapshot(pool, "v", f"t{number}")
            results["snapshot_create_seconds_direct"] = round(time.monotonic() - started, 2)
            for number in range(arguments.snapshots):
                history.remove_snapshot(pool, "v", f"s{number}")
                history.remove_snapshot(pool, "v", f"t{number}")
            history.remove_snapshot(pool, "v", "deep")
            volume = pool.volume("v")
            for offset in range(0, size, 2 * MiB):  # every other MiB again: the first log is half dead
                volume.write(block, offset)
            volume.flush()
            history.prune(pool, "v", 0)
            before = sum(pool.chunks.get(chunk).size_bytes for chunk in pool.chunks.ids())
            report = compaction.compact(pool, min_dead=0.4)
            after = sum(pool.chunks.get(chunk).size_bytes for chunk in pool.chunks.ids())
            results["compaction"] = {"log_bytes_before": before, "log_bytes_after": after,
                                     "reclaimed_bytes": before - after, "copied_bytes": report["copied_bytes"],
                                     "seconds": report["seconds"], "victims": len(report["victims"]),
                                     "copy_mbps": round(report["copied_bytes"] / report["seconds"] / 1e6, 1)
                                     if report["seconds"] else 0.0,
                                     "freed_mbps": round(report["freed_bytes"] / report["seconds"] / 1e6, 1)
                                     if report["seconds"] else 0.0}
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)
    out = os.path.join(arguments.scratch, f"history-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(out, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"| figure | value |\n|---|---|")
    print(f"| {arguments.snapshots} snapshots, one command beside a server | {results['snapshot_create_seconds_served']} s |")
    print(f"| {arguments.snapshots} snapshots through the API | {results['snapshot_create_seconds_direct']} s |")
    for key, figure in results["reads"].items():
        print(f"| read {key} | {figure['mbps']} MB/s, {figure['iops']} IOPS |")
    for name in ("seqread_1M_qd8", "randread_4k_qd16"):
        print(f"| snapshot {arguments.flushes} flushes deep / live, {name} | {results[f'snapshot_over_live_{name}']} |")
    c = results["compaction"]
    print(f"| compaction | freed {c['victims']} chunks: log {c['log_bytes_before'] / 1e6:.0f} -> "
          f"{c['log_bytes_after'] / 1e6:.0f} MB; copied {c['copied_bytes'] / 1e6:.0f} MB at {c['copy_mbps']} MB/s "
          f"({c['freed_mbps']} MB/s of chunks freed) |")
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
