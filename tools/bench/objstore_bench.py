"""Object-store throughput and tiering latency, against a real Ceph (RADOS) and radosgw (S3)
started on loopback by tools/objstore_lab.py:

    .venv/bin/python tools/bench/objstore_bench.py [--reps N] [--size-mib N] [--reads N]

Each repetition uses a fresh pool (a new pool uuid, so nothing is skipped as already in the
store), written in-process (`Pool`, `volume("v").write`) with --size-mib MiB of random bytes in
1 MiB writes and a flush point every 8 MiB, in chunks of 64 MiB. Then, with the real `chunkvol`
CLI for everything a user runs:

- ship: `mirror add r --to rados:CONF:POOL` / `mirror add s --to s3:ENDPOINT/BUCKET`, then the
  time of `mirror sync` (its own "in X s" and the command's wall time); bytes are the mirror's
  `shipped_bytes` (`mirror status --json`);
- restore: `restore --from URL --pool NEW --pool-uuid UUID --json` (its bytes and seconds);
- the same ship and restore with a key (`chunkvol key generate`, `mirror add ... --key`,
  `restore ... --key`: every object sealed with AES-256-GCM), from a copy of the pool made
  before any mirror was added (the same pool uuid and log), in the same repetition, the
  order of the two alternating between repetitions so that a drifting machine favours neither;
- tiering: the pool is copied (the copy evicts to S3, the original to RADOS), `chunk evict
  --keep-under 0 --mirror r|s` (upload throughput: freed bytes / wall time of the command),
  then 4 KiB reads of evicted blocks through `Pool.open(P, readonly=True)`: cold (each in a
  1 MiB unit not yet in the local cache: a fetch from the store, checked by the remote-chunk
  fetch counters) and warm (the same offsets again, from the cache);
- the raw store, for comparison: the same bytes as 8 MiB objects put and got one at a time
  (rados write_full/read, boto3 put_object/get_object: the shipper also sends one 8 MiB batch
  at a time), and ranged 1 MiB GETs (what a cold read fetches); for the warm reads, the same
  4 KiB reads on the pool before eviction (local chunks).

Between the steps the objects of the step are deleted (and radosgw's garbage collection run):
the lab's OSD keeps its objects in a 1 GiB memstore. Every figure is the median over --reps.
Writes docs/bench/objstore-YYYYMMDD-HHMMSS.md and prints the same table. The lab and every
temporary pool live in one temporary directory, removed at the end (also on failure).
"""

import argparse
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))

import procstat  # noqa: E402
from chunkvol.pool import Pool  # noqa: E402
from tools.objstore_lab import Lab, free_port  # noqa: E402

# The CLI of the interpreter running this (the venv's), importing chunkvol from ROOT (below), so
# the commands and the in-process code are the same tree.
def _chunkvol_cli():
    beside = os.path.join(os.path.dirname(sys.executable), "chunkvol")
    return beside if os.access(beside, os.X_OK) else os.path.join(ROOT, ".venv", "bin", "chunkvol")


CHUNKVOL = _chunkvol_cli()
MiB = 1 << 20
CHUNK_SIZE = "64M"
FLUSH_EVERY_MIB = 8
RAW_OBJECT_BYTES = 8 * MiB
MEMSTORE_MIB = 1024  # memstore device bytes in tools/objstore_lab.py
RAW_PREFIX = "objstore-bench-raw/"
SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
HEADER_SAMPLES = 20  # ranged gets of 120 bytes: what restore reads of every segment first


class BenchError(Exception):
    pass


# -- helpers ---------------------------------------------------------------------------------

def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def p99(values):
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)] if ordered else None


def log(text):
    print(text, file=sys.stderr, flush=True)


class Runner:
    """The chunkvol CLI with the lab's credentials in its environment."""

    def __init__(self, env):
        self.env = env
        self.commands = []  # one example of each command line, for the report

    def run(self, *arguments):
        started = time.monotonic()
        done = subprocess.run([CHUNKVOL, *arguments], capture_output=True, text=True, env=self.env,
                              stdin=subprocess.DEVNULL)
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise BenchError(f"`chunkvol {' '.join(arguments)}` failed (exit {done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return done.stdout, wall


class Stores:
    """Direct clients of the lab's RADOS pool and S3 bucket: the raw figures and the cleanup."""

    def __init__(self, info):
        import boto3
        import rados
        from botocore.config import Config
        self.info = info
        self.cluster = rados.Rados(conffile=info["ceph_conf"])
        self.cluster.connect(timeout=10)
        self.ioctx = self.cluster.open_ioctx(info["rados_pool"])
        self.bucket = info["s3_bucket"]
        self.s3 = boto3.client("s3", endpoint_url=info["s3_endpoint"], region_name=info["s3_region"],
                               aws_access_key_id=info["access_key"], aws_secret_access_key=info["secret_key"],
                               config=Config(s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=60))

    def close(self):
        self.ioctx.close()
        self.cluster.shutdown()

    # raw operations, by store kind
    def put(self, kind, name, data):
        if kind == "rados":
            self.ioctx.write_full(name, data)
        else:
            self.s3.put_object(Bucket=self.bucket, Key=name, Body=data)

    def get(self, kind, name, offset=0, length=None):
        if kind == "rados":
            return self.ioctx.read(name, length, offset)
        arguments = {"Bucket": self.bucket, "Key": name}
        if offset or length != RAW_OBJECT_BYTES:
            arguments["Range"] = f"bytes={offset}-{offset + length - 1}"
        return self.s3.get_object(**arguments)["Body"].read()

    def names(self, kind, prefix):
        if kind == "rados":
            return [item.key for item in self.ioctx.list_objects() if item.key.startswith(prefix)]
        found, token = [], None
        while True:
            arguments = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                arguments["ContinuationToken"] = token
            response = self.s3.list_objects_v2(**arguments)
            found += [item["Key"] for item in response.get("Contents", ())]
            if not response.get("IsTruncated"):
                return found
            token = response["NextContinuationToken"]

    def delete_prefix(self, kind, prefix):
        """Delete every object under `prefix`; for S3, also run radosgw's garbage collection
        at once (it frees a deleted object's data only after 2 h by default)."""
        names = self.names(kind, prefix)
        if kind == "rados":
            for name in names:
                self.ioctx.remove_object(name)
            return len(names)
        for start in range(0, len(names), 1000):
            self.s3.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": name} for name in names[start:start + 1000]], "Quiet": True})
        done = subprocess.run(["radosgw-admin", "-c", self.info["ceph_conf"], "gc", "process", "--include-all"],
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise BenchError(f"radosgw-admin gc process failed: {done.stderr.strip()[-500:]}")
        return len(names)

    def leftovers(self):
        """Objects left in the RADOS pool and the bucket (none after each repetition)."""
        return len(self.names("rados", "")) + len(self.names("s3", ""))


class CpuAccount:
    """CPU used by other people's processes: the machine's busy time minus this process, its
    children (the chunkvol commands, radosgw-admin) and the lab's daemons. This VM is shared;
    a figure measured while others took a core is worth less, so the report says how much."""

    def __init__(self, lab_pids):
        self.lab_pids = list(lab_pids)

    def own_seconds(self):
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (procstat.cpu_seconds(os.getpid()) + children.ru_utime + children.ru_stime
                + sum(procstat.cpu_seconds(pid) for pid in self.lab_pids))

    def sample(self):
        return time.monotonic(), procstat.machine_busy_seconds(), self.own_seconds()

    @staticmethod
    def others_percent(before, after):
        wall = after[0] - before[0]
        return max(0.0, 100.0 * ((after[1] - before[1]) - (after[2] - before[2])) / wall) if wall > 0 else 0.0

    def wait_for_quiet(self, limit, threshold):
        """Up to `limit` s until others use < `threshold` % of a core; returns (waited s, last %)."""
        started, others = time.monotonic(), None
        while limit > 0:
            before = self.sample()
            time.sleep(1.0)
            others = self.others_percent(before, self.sample())
            if others < threshold or time.monotonic() - started >= limit:
                break
        return time.monotonic() - started, others


def raw_throughput(stores, kind, total_bytes, unit_samples, rng):
    """Sequential puts then gets of `total_bytes` in 8 MiB objects; then ranged gets of 120
    bytes (median ms) and `unit_samples` ranged 1 MiB gets at random offsets. Returns
    ({put_mb_s, get_mb_s, small_get_ms}, [1 MiB get latencies, s])."""
    count = max(1, total_bytes // RAW_OBJECT_BYTES)
    names = [f"{RAW_PREFIX}{rng.getrandbits(64):016x}/{index:08x}" for index in range(count)]
    payloads = [rng.randbytes(RAW_OBJECT_BYTES) for _ in range(min(count, 4))]
    started = time.perf_counter()
    for index, name in enumerate(names):
        stores.put(kind, name, payloads[index % len(payloads)])
    put_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for name in names:
        if len(stores.get(kind, name, 0, RAW_OBJECT_BYTES)) != RAW_OBJECT_BYTES:
            raise BenchError(f"raw {kind} get of {name} came back short")
    get_seconds = time.perf_counter() - started
    small = []
    for _ in range(HEADER_SAMPLES):
        started = time.perf_counter()
        stores.get(kind, rng.choice(names), 0, 120)
        small.append(time.perf_counter() - started)
    latencies = []
    for _ in range(unit_samples):
        name = rng.choice(names)
        offset = rng.randrange(0, RAW_OBJECT_BYTES // MiB) * MiB
        started = time.perf_counter()
        stores.get(kind, name, offset, MiB)
        latencies.append(time.perf_counter() - started)
    stores.delete_prefix(kind, RAW_PREFIX)
    total = count * RAW_OBJECT_BYTES
    return {"put_mb_s": total / put_seconds / 1e6, "get_mb_s": total / get_seconds / 1e6,
            "small_get_ms": median(small) * 1e3}, latencies


# -- one repetition ---------------------------------------------------------------------------

def write_pool(cli, path, size_mib, rng):
    cli.run("--pool", path, "init", "--chunk-size", CHUNK_SIZE)
    cli.run("--pool", path, "volume", "create", "v", "--size", f"{size_mib}M")
    started = time.perf_counter()
    with Pool.open(path) as pool:
        volume = pool.volume("v")
        for index in range(size_mib):
            volume.write(rng.randbytes(MiB), index * MiB)
            if (index + 1) % FLUSH_EVERY_MIB == 0:
                pool.flush()
        pool.flush()
        pool_uuid = pool.pool_uuid.hex()
    return pool_uuid, size_mib * MiB / (time.perf_counter() - started) / 1e6


def ship(cli, path, name):
    out, wall = cli.run("--pool", path, "mirror", "sync", name)
    # "... 512.3 MiB shipped at 245.3 MiB/s in 2.1s": the rate has 4 digits, the time 0.1 s.
    match = re.search(r" at ([0-9.]+) (B|KiB|MiB|GiB)/s in ([0-9.]+)s\s*$", out.strip())
    if match is None:
        raise BenchError(f"`mirror sync {name}` printed no rate: {out.strip()}")
    rate = float(match.group(1)) * SIZE_UNITS[match.group(2)]
    status = json.loads(cli.run("--pool", path, "mirror", "status", name, "--json")[0])
    if status.get("last_error") or not status.get("shipped_bytes"):
        raise BenchError(f"mirror {name} did not ship: {status}")
    shipped = status["shipped_bytes"]
    return {"bytes": shipped, "seconds": float(match.group(3)), "wall": wall, "mb_s": rate / 1e6,
            "wall_mb_s": shipped / wall / 1e6, "printed": out.strip()}


def restore(cli, url, target, pool_uuid, key=None):
    out, wall = cli.run("restore", "--from", url, "--pool", target, "--pool-uuid", pool_uuid, "--json",
                        *(("--key", key) if key else ()))
    report = json.loads(out)
    if report["volumes"] != ["v"]:
        raise BenchError(f"restore from {url} gave volumes {report['volumes']}")
    shutil.rmtree(target)
    return {"bytes": report["bytes"], "seconds": report["seconds"], "wall": wall,
            "segments": report["segments"], "mb_s": report["bytes"] / report["seconds"] / 1e6}


def evict(cli, path, mirror):
    out, wall = cli.run("--pool", path, "chunk", "evict", "--keep-under", "0", "--mirror", mirror, "--json")
    results = json.loads(out)
    freed = sum(result["freed_bytes"] for result in results)
    if not results or not freed:
        raise BenchError(f"`chunk evict --mirror {mirror}` evicted nothing: {out.strip()}")
    chunks = json.loads(cli.run("--pool", path, "chunk", "list", "--json")[0])
    evicted_bytes = sum(row["size"] for row in chunks if row["where"] == "evicted")
    return {"chunks": len(results), "bytes": freed, "wall": wall, "mb_s": freed / wall / 1e6,
            "evicted_bytes": evicted_bytes, "local_chunks": sum(row["where"] == "local" for row in chunks)}


def pick_offsets(evicted_bytes, count, rng):
    """4 KiB offsets in distinct, non-adjacent volume MiBs that lie in the evicted chunks.
    The volume was written in order, so volume offset x sits near log offset x (plus record
    headers: a margin keeps clear of the last evicted chunk's end)."""
    usable_mib = int((evicted_bytes * 0.97 - 2 * MiB) // MiB)
    candidates = list(range(0, max(usable_mib, 0), 2))
    chosen = rng.sample(candidates, min(count, len(candidates)))
    return [mib * MiB + rng.randrange(0, MiB // 4096) * 4096 for mib in chosen]


def remote_fetches(pool):
    return sum(chunk.remote.fetches for chunk in pool.chunks.chunks.values() if chunk.remote is not None)


def timed_reads(path, offsets, expect_fetch):
    """Latencies (s) of 4 KiB reads at `offsets` in a read-only open of the pool. With
    `expect_fetch` (None: no check), keep only the reads that did (True) or did not (False)
    fetch from the store; returns (latencies, reads that did not match, the first read's
    latency: a cold one also connects to the store)."""
    latencies, mismatched, first = [], 0, None
    buffer = bytearray(4096)
    with Pool.open(path, readonly=True) as pool:
        volume = pool.volume("v")
        for offset in offsets:
            before = remote_fetches(pool)
            started = time.perf_counter()
            volume.read(buffer, offset)
            elapsed = time.perf_counter() - started
            first = elapsed if first is None else first
            if expect_fetch is not None and (remote_fetches(pool) > before) != expect_fetch:
                mismatched += 1
                continue
            latencies.append(elapsed)
    return latencies, mismatched, first


def drop_caches(path):
    removed = 0
    for directory, _, names in os.walk(path):
        for name in names:
            if name.startswith("chunk-") and name.endswith(".cache"):
                os.remove(os.path.join(directory, name))
                removed += 1
    return removed


def repetition(arguments, cli, stores, urls, scratch, rng):
    """One fresh pool through every step; `repetition.count` alternates the key's order."""
    result = {}
    source = os.path.join(scratch, "source")
    copy = os.path.join(scratch, "copy")
    pool_uuid, result["local_write_mb_s"] = write_pool(cli, source, arguments.size_mib, rng)
    prefix = f"chunkvol/{pool_uuid}/"
    log(f"  pool {pool_uuid}: {arguments.size_mib} MiB written in-process at {result['local_write_mb_s']:.0f} MB/s")
    keyed = os.path.join(scratch, "keyed")
    shutil.copytree(source, keyed, symlinks=True)  # the same log, shipped encrypted
    key = os.path.join(scratch, "bench.key")
    cli.run("key", "generate", key)
    variants = [("", source, None), ("_key", keyed, key)]
    if repetition.count % 2:
        variants.reverse()
    repetition.count += 1
    for kind, mirror in (("rados", "r"), ("s3", "s")):
        # The raw figures right before chunkvol's on the same store: a shared machine drifts.
        result[f"raw_{kind}"], result[f"raw_unit_{kind}"] = raw_throughput(
            stores, kind, arguments.size_mib * MiB, arguments.reads, rng)
        log(f"  raw {kind}: put {result[f'raw_{kind}']['put_mb_s']:.1f} MB/s, get {result[f'raw_{kind}']['get_mb_s']:.1f} MB/s, "
            f"1 MiB ranged get median {median(result[f'raw_unit_{kind}']) * 1e3:.2f} ms")
        for variant, path, variant_key in variants:
            # Added just before its sync: the store refuses a pool stored both ways at once.
            name = mirror + ("k" if variant_key else "")
            cli.run("--pool", path, "mirror", "add", name, "--to", urls[kind], *(("--key", variant_key) if variant_key else ()))
            shipped = result[f"ship{variant}_{kind}"] = ship(cli, path, name)
            log(f"  ship{variant} {kind}: {shipped['printed']} (wall {shipped['wall']:.2f} s)")
            restored = result[f"restore{variant}_{kind}"] = restore(
                cli, urls[kind], os.path.join(scratch, f"restored-{kind}"), pool_uuid, variant_key)
            log(f"  restore{variant} {kind}: {restored['mb_s']:.1f} MB/s ({restored['seconds']:.2f} s, "
                f"wall {restored['wall']:.2f} s)")
            # The mirror's segments go (memstore is 1 GiB; the two variants share the pool's
            # prefix); eviction checks the mirror's cursor only.
            stores.delete_prefix(kind, prefix)
    shutil.rmtree(keyed)
    # The copy evicts to S3, the source to RADOS: a chunk can leave the disk only once.
    shutil.copytree(source, copy, symlinks=True)
    offsets = None
    for kind, mirror, path in (("rados", "r", source), ("s3", "s", copy)):
        eviction = result[f"evict_{kind}"] = evict(cli, path, mirror)
        log(f"  evict {kind}: {eviction['chunks']} chunks, {eviction['bytes'] / MiB:.0f} MiB in {eviction['wall']:.2f} s "
            f"({eviction['mb_s']:.1f} MB/s); {eviction['local_chunks']} chunk(s) left local")
        if offsets is None:
            offsets = pick_offsets(eviction["evicted_bytes"], arguments.reads, rng)
            # The local baseline: the same reads on the copy, not evicted yet.
            result["local_read"] = timed_reads(copy, offsets, None)[0]
        drop_caches(path)
        cold, cold_missed, result[f"cold_first_{kind}"] = timed_reads(path, offsets, True)
        warm, warm_missed, _ = timed_reads(path, offsets, False)
        result[f"cold_{kind}"], result[f"warm_{kind}"] = cold, warm
        result[f"cold_missed_{kind}"], result[f"warm_missed_{kind}"] = cold_missed, warm_missed
        log(f"  reads {kind}: cold median {median(cold) * 1e3:.2f} ms p99 {p99(cold) * 1e3:.2f} ms ({len(cold)} fetched, "
            f"{cold_missed} did not); warm median {median(warm) * 1e3:.3f} ms p99 {p99(warm) * 1e3:.3f} ms "
            f"({warm_missed} fetched again)")
        stores.delete_prefix(kind, prefix)
    shutil.rmtree(source)
    shutil.rmtree(copy)
    result["pool_uuid"] = pool_uuid
    return result


repetition.count = 0


# -- the report --------------------------------------------------------------------------------

def source_tree():
    """Which chunkvol was measured: the commit of ROOT and whether chunkvol/ had changes."""
    def git(*arguments):
        done = subprocess.run(["git", "-C", ROOT, *arguments], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None
    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "not a git checkout"
    changed = [line for line in (git("status", "--porcelain", "--", "chunkvol") or "").splitlines() if line]
    return f"commit {commit}" + (f", with {len(changed)} uncommitted change(s) under chunkvol/" if changed
                                 else ", chunkvol/ unchanged")


def machine(info, scratch):
    def first_line(*command):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        return ((done.stdout or done.stderr).strip().splitlines() or ["unknown"])[0]
    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        memory = int(meminfo.readline().split()[1]) * 1024
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": memory / (1 << 30), "kernel": platform.release(),
            "ceph": first_line("ceph", "--version"),
            "disk": first_line("findmnt", "-T", scratch, "-no", "SOURCE,FSTYPE"),
            "lab_startup_seconds": info.get("startup_seconds", {}).get("total")}


def build_report(arguments, runs, info, scratch, started_at):
    def med(key, field=None):
        return median([(run[key][field] if field else run[key]) for run in runs])

    def med_lat(key, fn):
        return median([fn(run[key]) * 1e3 for run in runs if run[key]])

    rows = []  # (figure, unit, rados, s3, raw rados, raw s3)
    rows.append(("ship (`mirror sync`, its own time)", "MB/s", med("ship_rados", "mb_s"), med("ship_s3", "mb_s"),
                 med("raw_rados", "put_mb_s"), med("raw_s3", "put_mb_s")))
    rows.append(("ship (`mirror sync`, wall time of the command)", "MB/s", med("ship_rados", "wall_mb_s"),
                 med("ship_s3", "wall_mb_s"), med("raw_rados", "put_mb_s"), med("raw_s3", "put_mb_s")))
    rows.append(("restore (`restore --json` seconds)", "MB/s", med("restore_rados", "mb_s"), med("restore_s3", "mb_s"),
                 med("raw_rados", "get_mb_s"), med("raw_s3", "get_mb_s")))
    rows.append(("ship with a key (`mirror add --key`, `mirror sync`, its own time)", "MB/s",
                 med("ship_key_rados", "mb_s"), med("ship_key_s3", "mb_s"),
                 med("raw_rados", "put_mb_s"), med("raw_s3", "put_mb_s")))
    rows.append(("restore with a key (`restore --key`, `--json` seconds)", "MB/s", med("restore_key_rados", "mb_s"),
                 med("restore_key_s3", "mb_s"), med("raw_rados", "get_mb_s"), med("raw_s3", "get_mb_s")))
    rows.append(("evict upload (`chunk evict`, wall time)", "MB/s", med("evict_rados", "mb_s"), med("evict_s3", "mb_s"),
                 med("raw_rados", "put_mb_s"), med("raw_s3", "put_mb_s")))
    rows.append(("cold 4 KiB read of an evicted block, median (raw: 1 MiB ranged get)", "ms",
                 med_lat("cold_rados", median), med_lat("cold_s3", median),
                 med_lat("raw_unit_rados", median), med_lat("raw_unit_s3", median)))
    rows.append(("cold 4 KiB read, p99 (raw: 1 MiB ranged get)", "ms", med_lat("cold_rados", p99), med_lat("cold_s3", p99),
                 med_lat("raw_unit_rados", p99), med_lat("raw_unit_s3", p99)))
    local_median, local_p99 = med_lat("local_read", median), med_lat("local_read", p99)
    rows.append(("warm 4 KiB read (cached), median (raw: same read, chunk local)", "ms",
                 med_lat("warm_rados", median), med_lat("warm_s3", median), local_median, local_median))
    rows.append(("warm 4 KiB read (cached), p99 (raw: same read, chunk local)", "ms",
                 med_lat("warm_rados", p99), med_lat("warm_s3", p99), local_p99, local_p99))

    def cell(value, unit):
        if value is None:
            return "-"
        if unit == "ms":
            return f"{value:.3f}" if value < 1 else f"{value:.2f}"
        return f"{value:,.1f}"

    def ratio(value, raw):
        return f"{value / raw:.2f}" if value is not None and raw else "-"

    machine_info = machine(info, scratch)
    first = runs[0]

    def header_seconds(kind):
        return first[f"restore_{kind}"]["segments"] * med(f"raw_{kind}", "small_get_ms") / 1e3
    lines = [
        f"# chunkvol object-store bench, {started_at}", "",
        f"`{' '.join(['tools/bench/objstore_bench.py'] + sys.argv[1:])}`: {arguments.reps} repetitions, "
        f"each on a fresh pool (chunks of {CHUNK_SIZE}) of {arguments.size_mib} MiB of random bytes written "
        f"in-process in 1 MiB writes with a flush point every {FLUSH_EVERY_MIB} MiB; {arguments.reads} reads of "
        "4 KiB for each latency; medians over the repetitions (of each run's median or p99 for latencies).", "",
        f"Machine: {machine_info['nproc']} CPUs ({machine_info['cpu']}), {machine_info['memory_gib']:.0f} GiB, "
        f"Linux {machine_info['kernel']}; local pools on {machine_info['disk']}. Store: tools/objstore_lab.py, "
        f"{machine_info['ceph']}, one monitor and one OSD with memstore ({MEMSTORE_MIB} MiB, objects in RAM), "
        "one replica, radosgw (beast) for S3, all on 127.0.0.1 loopback and sharing the 2 CPUs with chunkvol "
        f"(lab start-up {machine_info['lab_startup_seconds']} s). chunkvol: {source_tree()}. The VM is shared: "
        f"other processes used {med('others_percent'):.0f} % of a core (median over the repetitions, after a "
        f"quiet wait of up to {arguments.quiet_wait:.0f} s for < {arguments.quiet_threshold:.0f} %).", "",
        "MB/s are 10^6 bytes per second of log bytes (ship: the mirror's shipped_bytes; restore: the segments' "
        "payload bytes; evict: the chunk bytes freed). Raw store: the same number of bytes as 8 MiB objects "
        "put (or got) one after the other, with rados write_full/read and boto3 put_object/get_object in the "
        "bench process, the objects deleted after; for latencies, ranged 1 MiB gets (what a cold read fetches) "
        "and, for warm reads, the same 4 KiB reads of the pool before eviction. Ratio = chunkvol / raw: "
        "for MB/s the fraction of what the store gives, for ms how many times slower.", "",
        "| figure | unit | RADOS | S3 | raw RADOS | raw S3 | ratio RADOS | ratio S3 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for figure, unit, rados_value, s3_value, raw_rados, raw_s3 in rows:
        lines.append(f"| {figure} | {unit} | {cell(rados_value, unit)} | {cell(s3_value, unit)} | "
                     f"{cell(raw_rados, unit)} | {cell(raw_s3, unit)} | {ratio(rados_value, raw_rados)} | "
                     f"{ratio(s3_value, raw_s3)} |")
    lines += ["", f"Local write (in-process, for context): {med('local_write_mb_s'):,.0f} MB/s. "
              f"Shipped {first['ship_rados']['bytes'] / MiB:,.1f} MiB of log for {arguments.size_mib} MiB written; "
              f"restored {first['restore_rados']['segments']} segments; evicted {first['evict_rados']['chunks']} "
              f"chunks ({first['evict_rados']['bytes'] / MiB:,.0f} MiB), {first['evict_rados']['local_chunks']} "
              "left local (the one being written).", "",
              f"Raw ranged get of 120 bytes: RADOS {med('raw_rados', 'small_get_ms'):.2f} ms, S3 "
              f"{med('raw_s3', 'small_get_ms'):.2f} ms. `restore` reads each segment's 120-byte header this way, one "
              f"after the other, before it fetches any segment: {first['restore_rados']['segments']} such reads take "
              f"about {header_seconds('rados'):.2f} s of its {med('restore_rados', 'seconds'):.2f} s on RADOS and "
              f"{header_seconds('s3'):.2f} s of its {med('restore_s3', 'seconds'):.2f} s on S3. "
              f"First cold read of an open pool (it also connects to the store): RADOS "
              f"{median([run['cold_first_rados'] for run in runs]) * 1e3:.1f} ms, S3 "
              f"{median([run['cold_first_s3'] for run in runs]) * 1e3:.1f} ms.", ""]
    def key_ratio(step, kind):
        return median([run[f"{step}_key_{kind}"]["mb_s"] / run[f"{step}_{kind}"]["mb_s"] for run in runs])
    lines += [f"With a key against without (median of each repetition's ratio, target >= 0.9): ship RADOS "
              f"{key_ratio('ship', 'rados'):.2f}x, S3 {key_ratio('ship', 's3'):.2f}x; restore RADOS "
              f"{key_ratio('restore', 'rados'):.2f}x, S3 {key_ratio('restore', 's3'):.2f}x. Per repetition "
              "(ship RADOS, ship S3, restore RADOS, restore S3, MB/s with / without): "
              + "; ".join(" ".join(f"{run[f'{step}_key_{kind}']['mb_s']:.1f}/{run[f'{step}_{kind}']['mb_s']:.1f}"
                                   for step in ("ship", "restore") for kind in ("rados", "s3")) for run in runs)
              + ".", ""]
    missed = [(run[f"cold_missed_{kind}"], run[f"warm_missed_{kind}"]) for run in runs for kind in ("rados", "s3")]
    if any(cold or warm for cold, warm in missed):
        lines += [f"Reads left out: cold reads that fetched nothing, warm reads that fetched: {missed}.", ""]
    lines += ["Per repetition:", "",
              "| rep | ship RADOS | ship S3 | restore RADOS | restore S3 | evict RADOS | evict S3 | raw put RADOS / S3 "
              "| raw get RADOS / S3 | cold ms RADOS / S3 (p99) | warm ms RADOS / S3 (p99) | others' CPU |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for index, run in enumerate(runs, 1):
        lines.append(
            f"| {index} | {run['ship_rados']['mb_s']:.1f} ({run['ship_rados']['seconds']:.1f} s) | "
            f"{run['ship_s3']['mb_s']:.1f} ({run['ship_s3']['seconds']:.1f} s) | {run['restore_rados']['mb_s']:.1f} | "
            f"{run['restore_s3']['mb_s']:.1f} | {run['evict_rados']['mb_s']:.1f} | {run['evict_s3']['mb_s']:.1f} | "
            f"{run['raw_rados']['put_mb_s']:.1f} / {run['raw_s3']['put_mb_s']:.1f} | "
            f"{run['raw_rados']['get_mb_s']:.1f} / {run['raw_s3']['get_mb_s']:.1f} | "
            f"{median(run['cold_rados']) * 1e3:.2f} / {median(run['cold_s3']) * 1e3:.2f} "
            f"({p99(run['cold_rados']) * 1e3:.2f} / {p99(run['cold_s3']) * 1e3:.2f}) | "
            f"{median(run['warm_rados']) * 1e3:.3f} / {median(run['warm_s3']) * 1e3:.3f} "
            f"({p99(run['warm_rados']) * 1e3:.3f} / {p99(run['warm_s3']) * 1e3:.3f}) | "
            f"{run['others_percent']:.0f} % |")
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--size-mib", type=int, default=512, help="MiB written per pool (default 512)")
    parser.add_argument("--reads", type=int, default=200, help="4 KiB reads per latency figure (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="before each repetition, wait up to this many seconds for other processes to use "
                             "less than --quiet-threshold %% of a core (default 20; 0: do not wait)")
    parser.add_argument("--quiet-threshold", type=float, default=10.0)
    parser.add_argument("--no-write", action="store_true", help="print the results, write no file")
    arguments = parser.parse_args()
    if arguments.reps < 1:
        parser.error("--reps must be at least 1")
    if not 128 <= arguments.size_mib <= 640:
        parser.error("--size-mib must be 128..640: at least 2 chunks of 64 MiB, and the lab's OSD keeps its "
                     f"objects in a {MEMSTORE_MIB} MiB memstore")
    if not os.access(CHUNKVOL, os.X_OK):
        raise SystemExit(f"{CHUNKVOL} is missing: run `make install`")
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [part for part in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if part])
    Runner(dict(os.environ)).run("--help")  # a chunkvol that cannot start fails here, before the lab
    rng = random.Random(arguments.seed)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # SIGTERM ends the run through the finally clauses (the lab stopped, the directory removed).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ["PATH"] = "/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", "")
    scratch = tempfile.mkdtemp(prefix="objstore-bench-")
    lab = Lab(os.path.join(scratch, "lab"), mon_port=free_port(43300), rgw_port=free_port(43080))
    stores = None
    runs = []
    try:
        began = time.monotonic()
        log(f"starting the lab in {lab.directory} (mon port {lab.mon_port}, S3 port {lab.rgw_port})")
        info = lab.up(rgw=True)
        log(f"lab up in {info['startup_seconds']['total']} s")
        # For the CLI (the S3 backend takes boto3's usual credentials) and for the in-process
        # reads of chunks evicted to S3.
        credentials = {"AWS_ACCESS_KEY_ID": info["access_key"], "AWS_SECRET_ACCESS_KEY": info["secret_key"],
                       "AWS_DEFAULT_REGION": info["s3_region"]}
        os.environ.update(credentials)
        cli = Runner(dict(os.environ))
        stores = Stores(info)
        urls = {"rados": f"rados:{info['ceph_conf']}:{info['rados_pool']}",
                "s3": f"s3:{info['s3_endpoint']}/{info['s3_bucket']}"}
        account = CpuAccount(info["pids"].values())
        for rep in range(arguments.reps):
            waited, others = account.wait_for_quiet(arguments.quiet_wait, arguments.quiet_threshold)
            log(f"rep {rep + 1}/{arguments.reps} (waited {waited:.0f} s for a quiet machine: others use "
                f"{others if others is not None else 0:.0f} % of a core)")
            rep_scratch = os.path.join(scratch, f"rep{rep + 1}")
            os.makedirs(rep_scratch)
            before = account.sample()
            run = repetition(arguments, cli, stores, urls, rep_scratch, rng)
            run["others_percent"] = account.others_percent(before, account.sample())
            run["quiet_wait_seconds"] = waited
            runs.append(run)
            shutil.rmtree(rep_scratch)
            left = stores.leftovers()
            log(f"  others used {run['others_percent']:.0f} % of a core meanwhile; {left} object(s) left in the store")
            if left:
                raise BenchError(f"{left} object(s) left in the store after repetition {rep + 1}")
        log(f"done in {time.monotonic() - began:.0f} s")
        text = build_report(arguments, runs, info, scratch, started_at)
    finally:
        if stores is not None:
            try:
                stores.close()
            except Exception as error:  # the lab is stopped below whatever happens here
                log(f"closing the store clients: {error}")
        try:
            lab.down()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print(text)
    if not arguments.no_write:
        out = os.path.join(ROOT, "docs", "bench", f"objstore-{stamp}.md")
        with open(out, "w") as handle:
            handle.write(text)
        print(f"results: {out}")


if __name__ == "__main__":
    try:
        main()
    except BenchError as error:
        raise SystemExit(f"objstore_bench: {error}") from None
