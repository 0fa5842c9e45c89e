"""A small asynchronous NBD load generator on libnbd, for the flush workload.

Why it exists: Debian's fio 3.33 with an asynchronous engine (nbd, libaio) at iodepth > 1
turns ``--fsync=32`` into a flush storm of about one flush per 2-8 writes (fixed upstream in
fio 3.38, commit 673159e6). A "random 4 KiB writes with a flush every 32 writes" number
measured with that fio is mostly a flush-latency number. Instead of patching and building
fio, this generator keeps exactly ``iodepth`` commands in flight over one connection and
issues exactly one NBD_CMD_FLUSH after every ``flush_every`` writes; it counts both and
prints them, so the ratio is checked, not assumed.

Semantics (documented in docs/BENCH.md):

- A flush takes one of the ``iodepth`` slots, like fio's sync io_u does. It is sent after
  the 32nd write is *issued*, not after it completes, so it covers whatever writes the
  server has completed by then (NBD semantics), exactly as fio's fixed behaviour does.
- Time based: commands completing during the first ``ramp_seconds`` are not counted;
  then completions are counted for ``runtime_seconds``; then no new commands are issued
  and the ones in flight are drained, uncounted.
- Offsets are uniformly random, block aligned, with replacement (fio's ``norandommap``).
- Written data: ``iodepth`` fixed buffers, each 512-byte segment ``compress_percent`` %
  zeros and the rest random bytes, like fio's ``buffer_compress_percentage``.

It is a separate process (run as ``python nbdload.py ...``), like fio, so its CPU time is
measured apart from the harness and the server. Output: one JSON object on stdout.
The Python client costs about 10 us of CPU per request: against the nbdkit memory plugin it
reaches ~80-85k 4 KiB writes/s where fio reaches ~130k, so it is the bottleneck only for the
C anchors. The optional workload ``randwrite_4k_qd16_nbdload`` (same client, no flushes)
shows that ceiling in a run (see docs/BENCH.md).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time

import nbd

SEGMENT_BYTES = 512


def make_write_buffer(length_bytes: int, compress_percent: int, rng: random.Random) -> bytearray:
    """Return data that compresses to about (100 - compress_percent) % of its size."""
    data = bytearray(length_bytes)
    random_bytes_per_segment = SEGMENT_BYTES * (100 - compress_percent) // 100
    for segment_start in range(0, length_bytes, SEGMENT_BYTES):
        data[segment_start:segment_start + random_bytes_per_segment] = rng.randbytes(random_bytes_per_segment)
    return data


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty list)."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, int(round(fraction * len(sorted_values) + 0.5)) - 1))
    return float(sorted_values[index])


class LoadGenerator:
    """Keeps ``iodepth`` commands in flight on one libnbd handle until the run ends."""

    def __init__(self, handle: nbd.NBD, arguments: argparse.Namespace):
        self.handle = handle
        self.rw = arguments.rw
        self.block_size_bytes = arguments.bs
        self.iodepth = arguments.iodepth
        self.flush_every_writes = arguments.flush_every
        self.read_percent = arguments.rwmixread
        self.export_size_bytes = handle.get_size()
        self.block_count = self.export_size_bytes // self.block_size_bytes
        self.sequential_offset_bytes = 0
        self.rng = random.Random(arguments.seed)
        self.buffers = []
        for _ in range(self.iodepth):
            content = make_write_buffer(self.block_size_bytes, arguments.compress_percent, self.rng)
            self.buffers.append(nbd.Buffer.from_bytearray(content))
        self.free_slots = list(range(self.iodepth))
        self.issue_time_ns = [0] * self.iodepth
        self.issue_kind = [""] * self.iodepth
        self.callbacks = [self._make_callback(slot) for slot in range(self.iodepth)]
        self.writes_since_flush = 0
        self.counting = False
        self.errors = 0
        self.counted = {"read": 0, "write": 0, "flush": 0}
        self.issued = {"read": 0, "write": 0, "flush": 0}
        self.latency_ns = {"read": [], "write": [], "flush": []}

    def _make_callback(self, slot: int):
        def completed(error) -> int:
            kind = self.issue_kind[slot]
            if error.value != 0:
                self.errors += 1
            if self.counting:
                self.counted[kind] += 1
                self.latency_ns[kind].append(time.perf_counter_ns() - self.issue_time_ns[slot])
            self.free_slots.append(slot)
            return 1
        return completed

    def _next_offset(self) -> int:
        if self.rw in ("write", "read"):
            offset = self.sequential_offset_bytes
            self.sequential_offset_bytes += self.block_size_bytes
            if self.sequential_offset_bytes + self.block_size_bytes > self.export_size_bytes:
                self.sequential_offset_bytes = 0
            return offset
        return self.rng.randrange(self.block_count) * self.block_size_bytes

    def _next_kind(self) -> str:
        if self.flush_every_writes and self.writes_since_flush >= self.flush_every_writes:
            self.writes_since_flush = 0
            return "flush"
        if self.rw in ("read", "randread"):
            return "read"
        if self.rw == "randrw" and self.rng.randrange(100) < self.read_percent:
            return "read"
        return "write"

    def _issue(self, slot: int) -> None:
        kind = self._next_kind()
        self.issue_kind[slot] = kind
        self.issued[kind] += 1
        self.issue_time_ns[slot] = time.perf_counter_ns()
        if kind == "flush":
            self.handle.aio_flush(completion=self.callbacks[slot])
        elif kind == "write":
            self.writes_since_flush += 1
            self.handle.aio_pwrite(self.buffers[slot], self._next_offset(), completion=self.callbacks[slot])
        else:
            self.handle.aio_pread(self.buffers[slot], self._next_offset(), completion=self.callbacks[slot])

    def _run_until(self, deadline_ns: int) -> None:
        free_slots = self.free_slots
        while time.perf_counter_ns() < deadline_ns:
            while free_slots:
                self._issue(free_slots.pop())
            self.handle.poll(-1)

    def run(self, ramp_seconds: float, runtime_seconds: float) -> dict:
        start_ns = time.perf_counter_ns()
        self._run_until(start_ns + int(ramp_seconds * 1e9))
        self.counting = True
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        measure_start_ns = time.perf_counter_ns()
        self._run_until(measure_start_ns + int(runtime_seconds * 1e9))
        self.counting = False
        measured_seconds = (time.perf_counter_ns() - measure_start_ns) / 1e9
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        while self.handle.aio_in_flight() > 0:
            self.handle.poll(-1)
        return self._summary(measured_seconds, cpu_after.ru_utime + cpu_after.ru_stime
                             - cpu_before.ru_utime - cpu_before.ru_stime)

    def _summary(self, measured_seconds: float, client_cpu_seconds: float) -> dict:
        data_ops = self.counted["read"] + self.counted["write"]
        result = {
            "tool": "nbdload",
            "rw": self.rw,
            "bs": self.block_size_bytes,
            "iodepth": self.iodepth,
            "flush_every": self.flush_every_writes,
            "seconds": measured_seconds,
            "ops": data_ops,
            "iops": data_ops / measured_seconds,
            "mbps": data_ops * self.block_size_bytes / measured_seconds / 1e6,
            "errors": self.errors,
            "issued": dict(self.issued),
            "counted": dict(self.counted),
            "writes_per_flush": (self.issued["write"] / self.issued["flush"]) if self.issued["flush"] else None,
            "client_cpu_seconds": client_cpu_seconds,
            "client_cpu_percent": 100.0 * client_cpu_seconds / measured_seconds,
        }
        for kind, values in self.latency_ns.items():
            if not values:
                continue
            values.sort()
            result[f"{kind}_lat_mean_us"] = sum(values) / len(values) / 1e3
            result[f"{kind}_lat_p50_us"] = percentile(values, 0.50) / 1e3
            result[f"{kind}_lat_p99_us"] = percentile(values, 0.99) / 1e3
        lat_key = "write" if self.counted["write"] >= self.counted["read"] else "read"
        result["lat_mean_us"] = result.get(f"{lat_key}_lat_mean_us", 0.0)
        result["lat_p99_us"] = result.get(f"{lat_key}_lat_p99_us", 0.0)
        return result


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", required=True, help="NBD URI, e.g. nbd+unix:///bench?socket=/path/sock")
    parser.add_argument("--rw", default="randwrite", choices=["randwrite", "randread", "randrw", "write", "read"])
    parser.add_argument("--bs", type=int, default=4096, help="block size in bytes")
    parser.add_argument("--iodepth", type=int, default=16)
    parser.add_argument("--flush-every", type=int, default=0, help="one flush after every N writes (0: none)")
    parser.add_argument("--rwmixread", type=int, default=70, help="percent reads for --rw randrw")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds not counted at the start")
    parser.add_argument("--runtime", type=float, default=8.0, help="seconds counted")
    parser.add_argument("--compress-percent", type=int, default=50, help="percent of each 512 B segment that is zero")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    handle = nbd.NBD()
    handle.connect_uri(arguments.uri)
    generator = LoadGenerator(handle, arguments)
    result = generator.run(arguments.ramp, arguments.runtime)
    handle.shutdown()
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
