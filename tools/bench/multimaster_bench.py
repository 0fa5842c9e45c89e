"""Multi-master bench: two nodes of one pool on this machine, both writing one volume.

Each set-up is what a user runs (README, the multi-master commands): pool A is made with
`init`, B joins it with `init --join`, both run `chunkvol serve --socket ... --listen
127.0.0.1:PORT` (nbdkit, the receiver in it, and the shipper process), `peer add` pairs them
both ways, and A makes `volume create mm --size 1G --mode multi-master`. Node A writes the
first half of mm, node B the second half.

(a) Foreground. Workloads, each on one NBD connection and limited to the node's half
(tools/bench/nbdload.py's generator, run as a process of its own like fio): random 4 KiB
writes QD16 with one flush after every 32 writes (IOPS), and sequential 1 MiB writes QD8
(MB/s). For each workload: A alone, B alone (the other node idle, but receiving and applying
what the writer ships), and both at once. Reference: one pool with no peers (`volume create`
without --mode), alone. Before every measurement the two nodes are left to converge (each
holds every record of the other) and the machine to quiet down (as tools/bench/run.py does:
others under --quiet-threshold % of a core). Every measurement runs on a fresh set-up, removed
after it (the log only grows: a few sequential runs on one pair fill a disk; --min-free-gib is
checked first). --reps repetitions of --runtime s (after --ramp s), the variants' order rotated
from one repetition to the next; medians. Also: how far behind the peer is when a run ends
and how long it takes to hold everything after it.

(b) Convergence after a partition. The replication link is cut both ways with iptables
(`-I INPUT -p tcp --dport PORT -j DROP` on both listeners; loopback traffic goes through
INPUT), each node writes N MiB (sequential 1 MiB writes to its half, then a flush), the cut is
held for --partition-seconds (--long-partitions adds rows with longer cuts), then removed.
Timed from the heal, per direction: when the receiver's `peer status --json`
incoming.records_held first grows (replication resumed) and when it reaches the sender's last
sequence (`status --json` log.next_sequence - 1; the shipper's own records_behind is not used:
it flickers between 0 and 1 with the heartbeat flush point each idle second); then until both
exports read identical (SHA-256 of the whole volume over NBD, repeated until equal). Each
size on a fresh pair.

Results: docs/bench/multimaster-YYYYMMDD-HHMMSS.md and .json beside it. Needs root
(iptables). Every process it starts is stopped by its process group, and the iptables rules
are removed, on every exit path.

    .venv/bin/python tools/bench/multimaster_bench.py [--reps 3] [--runtime 8] [--sizes 16,64,256]
"""

import argparse
import atexit
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "tools", "bench")
sys.path.insert(0, BENCH)

import procstat  # noqa: E402

CHUNKVOL = os.path.join(ROOT, ".venv", "bin", "chunkvol")
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
ENVIRONMENT = dict(os.environ, PATH="/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
MiB = 1 << 20
VOLUME = "mm"
VOLUME_BYTES = 1 << 30
HALF = VOLUME_BYTES // 2
WORKLOADS = {
    "randwrite_4k_qd16_flush32": ["--rw", "randwrite", "--bs", "4096", "--iodepth", "16", "--flush-every", "32"],
    "seqwrite_1M_qd8": ["--rw", "write", "--bs", str(MiB), "--iodepth", "8"],
}
FIGURE = {"randwrite_4k_qd16_flush32": ("iops", "IOPS"), "seqwrite_1M_qd8": ("mbps", "MB/s")}


def say(message):
    print(message, file=sys.stderr, flush=True)


def wait_for(check, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port):
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as handle:
        return any(line.split()[1] == wanted and line.split()[3] == "0A" for line in list(handle)[1:])


# ---- the load generator, limited to a region (run as `multimaster_bench.py load ...`) ----------

def load_main(argv):
    """nbdload.py's generator with its offsets inside [--region-offset, + --region-length)."""
    import nbd
    import nbdload

    class RegionLoad(nbdload.LoadGenerator):
        def __init__(self, handle, arguments, base, length):
            super().__init__(handle, arguments)
            self.base = base
            self.export_size_bytes = length
            self.block_count = length // self.block_size_bytes

        def _next_offset(self):
            return self.base + super()._next_offset()

    base, length = int(argv[0]), int(argv[1])
    arguments = nbdload.parse_arguments(argv[2:])
    handle = nbd.NBD()
    handle.connect_uri(arguments.uri)
    result = RegionLoad(handle, arguments, base, length).run(arguments.ramp, arguments.runtime)
    handle.shutdown()
    json.dump(result, sys.stdout)
    return 1 if result["errors"] else 0


# ---- nodes ---------------------------------------------------------------------------------

class Node:
    """`chunkvol --pool DIR serve --socket SOCK [--listen 127.0.0.1:PORT]`, in its own session."""

    def __init__(self, scratch, name, listen=True):
        self.name = name
        self.pool = os.path.join(scratch, name)
        self.socket = os.path.join(scratch, f"{name}.sock")
        self.log_path = os.path.join(scratch, f"{name}.log")
        self.port = free_port() if listen else None
        self.address = f"127.0.0.1:{self.port}"
        self.process = None
        self.peer_name = None

    def cv(self, *arguments):
        result = subprocess.run([CHUNKVOL, "--pool", self.pool, *arguments], capture_output=True, text=True,
                                env=ENVIRONMENT)
        if result.returncode != 0:
            raise RuntimeError(f"chunkvol --pool {self.pool} {' '.join(arguments)}: {result.stderr.strip()}")
        return result.stdout

    def json(self, *arguments):
        return json.loads(self.cv(*arguments, "--json"))

    def start(self):
        command = [CHUNKVOL, "--pool", self.pool, "serve", "--socket", self.socket]
        if self.port:
            command += ["--listen", self.address]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env=ENVIRONMENT, start_new_session=True)
        log.close()

        def ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"serve {self.name} exited: {self.log_tail()}")
            import nbd
            try:  # an NBD handshake, then abort (a bare connect is logged by nbdkit as a broken handshake)
                handle = nbd.NBD()
                handle.set_opt_mode(True)
                handle.connect_unix(self.socket)
                handle.opt_abort()
            except nbd.Error:
                return False
            return self.port is None or listening(self.port)

        wait_for(ready, 60, f"node {self.name} to serve")

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass

    def log_tail(self):
        with open(self.log_path, errors="replace") as handle:
            return handle.read()[-2000:]

    def cpu_seconds(self):
        return procstat.cpu_seconds(self.process.pid)

    def uri(self):
        return f"nbd+unix:///{VOLUME}?socket={self.socket}"

    def last_sequence(self):
        return self.json("status")["log"]["next_sequence"] - 1

    def peer_row(self):
        return self.json("peer", "status")["peers"][0]

    def shipped_bytes(self):
        return self.json("mirror", "status", self.peer_name)["shipped_bytes"]


class Pair:
    """Two nodes of one pool with peers both ways and the multi-master volume (or, with
    peers=False, one pool alone: the reference)."""

    def __init__(self, scratch, peers=True):
        self.scratch, self.peers = scratch, peers
        self.nodes = []

    def __enter__(self):
        shutil.rmtree(self.scratch, ignore_errors=True)
        os.makedirs(self.scratch)
        a = Node(self.scratch, "A", listen=self.peers)
        a.cv("init", "--chunk-size", "1G")
        self.nodes = [a]
        if not self.peers:
            a.cv("volume", "create", VOLUME, "--size", "1G")
            a.start()
            return self
        b = Node(self.scratch, "B")
        join = os.path.join(self.scratch, "b.join")
        a.cv("join-file", join)
        b.cv("init", "--join", join)
        self.nodes = [a, b]
        a.start()
        b.start()
        a.cv("peer", "add", "b", "--address", b.address)
        b.cv("peer", "add", "a", "--address", a.address)
        a.peer_name, b.peer_name = "b", "a"
        a.cv("volume", "create", VOLUME, "--size", "1G", "--mode", "multi-master")
        wait_for(lambda: any(row["name"] == VOLUME for row in b.json("volume", "list")), 60, "B to have the volume")
        self.converge()
        return self

    def __exit__(self, kind, value, traceback):
        for node in self.nodes:
            node.stop()
        if kind is None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        else:  # keep the logs and the pools' metadata, not gigabytes of chunks
            for node in self.nodes:
                shutil.rmtree(os.path.join(node.pool, "chunks"), ignore_errors=True)
            say(f"kept {self.scratch} (serve logs, pools without their chunks) for a look")

    def converge(self, timeout=600):
        """Seconds until each node holds every record the other had written when this was called."""
        if not self.peers:
            return 0.0
        start = time.monotonic()
        a, b = self.nodes
        wanted = {a.name: b.last_sequence(), b.name: a.last_sequence()}  # what each must hold
        done = set()

        def held():
            for node in (a, b):
                if node.name not in done and node.peer_row()["incoming"]["records_held"] >= wanted[node.name]:
                    done.add(node.name)
            return len(done) == 2

        try:
            wait_for(held, timeout, "the nodes to converge", interval=0.2)
        except RuntimeError:
            rows = {node.name: node.peer_row() for node in (a, b)}
            raise RuntimeError(f"the nodes did not converge in {timeout} s: each must hold {wanted}; "
                               f"peer status: {json.dumps(rows)}; logs: A {a.log_tail()} B {b.log_tail()}") from None
        return time.monotonic() - start


# ---- (a) foreground ----------------------------------------------------------------------

class Quiet:
    """Wait for the shared machine to quiet down before a measurement (tools/bench/run.py)."""

    def __init__(self, arguments):
        self.wait, self.threshold, self.budget = arguments.quiet_wait, arguments.quiet_threshold, arguments.quiet_budget

    def __call__(self):
        os.sync()
        start = time.monotonic()
        others = None
        limit = min(self.wait, self.budget)
        while limit > 0:
            others = procstat.others_cpu_percent(1.0)
            if others < self.threshold or time.monotonic() - start >= limit:
                break
        waited = time.monotonic() - start
        self.budget = max(0.0, self.budget - waited)
        return {"quiet_wait_seconds": round(waited, 1), "others_before_percent": others}


def run_loads(writers, workload, arguments):
    """Start the workload on every (node, region offset) at once; their results."""
    processes = []
    for node, offset in writers:
        command = [PYTHON, os.path.abspath(__file__), "load", str(offset), str(HALF), "--uri", node.uri(),
                   *WORKLOADS[workload], "--runtime", str(arguments.runtime), "--ramp", str(arguments.ramp),
                   "--seed", str(offset // MiB + 1)]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=ENVIRONMENT))
    results = []
    for process in processes:
        out, err = process.communicate(timeout=arguments.runtime + arguments.ramp + 300)
        if process.returncode != 0:
            raise RuntimeError(f"load generator failed ({process.returncode}): {err[-2000:]}")
        results.append(json.loads(out))
    return results


def measure(pair, variant, workload, arguments, quiet):
    """One measurement: `variant` is alone-A, alone-B, both, or solo (the pool with no peers)."""
    nodes = pair.nodes
    writers = {"alone-A": [(nodes[0], 0)], "solo": [(nodes[0], 0)],
               "alone-B": [(nodes[-1], HALF)], "both": [(nodes[0], 0), (nodes[-1], HALF)]}[variant]
    settle = pair.converge()
    context = quiet()
    cpu_before = {node.name: node.cpu_seconds() for node in nodes}
    busy_before = procstat.machine_busy_seconds()
    own_before = procstat.cpu_seconds(os.getpid())
    start = time.monotonic()
    results = run_loads(writers, workload, arguments)
    ended = time.monotonic()
    wall = ended - start
    node_cpu = {node.name: round(100 * (node.cpu_seconds() - cpu_before[node.name]) / wall, 1) for node in nodes}
    own = procstat.cpu_seconds(os.getpid()) - own_before + sum(result["client_cpu_seconds"] for result in results)
    busy = procstat.machine_busy_seconds() - busy_before
    behind = {}
    if pair.peers:
        for node, _ in writers:
            behind[node.name] = node.peer_row()["outgoing"]["bytes_behind"]
    pair.converge()
    catch_up = time.monotonic() - ended
    key = FIGURE[workload][0]
    row = {"variant": variant, "workload": workload, "settle_seconds": round(settle, 2),
           "catch_up_seconds_after": round(catch_up if pair.peers else 0.0, 2), "bytes_behind_at_end": behind,
           "wall_seconds": round(wall, 2), "node_cpu_percent": node_cpu,
           "others_cpu_percent": round(max(0.0, 100 * (busy - own) / wall), 1), **context}
    for (node, _), result in zip(writers, results):
        row[node.name] = {key: round(result[key], 1), "writes": result["counted"]["write"],
                          "flushes": result["counted"]["flush"], "lat_p99_us": round(result["lat_p99_us"], 1)}
    return row


def enough_space(arguments):
    """Every measurement starts on fresh pools; wait (up to 5 min) for --min-free-gib on the
    scratch disk: a sequential run writes gigabytes, stored twice (both nodes)."""
    os.makedirs(arguments.scratch, exist_ok=True)

    def free():
        return shutil.disk_usage(arguments.scratch).free >= arguments.min_free_gib * (1 << 30)

    try:
        wait_for(free, 300, "free space", interval=5)
    except RuntimeError:
        raise SystemExit(f"less than {arguments.min_free_gib} GiB free on {arguments.scratch}: "
                         f"{shutil.disk_usage(arguments.scratch).free / (1 << 30):.1f} GiB") from None


EVENTS = ("too slow", "unreachable", "failed", "refused", "no space")


def log_events(pair):
    """Replication complaints in the serve logs of a set-up: {node: {kind: count}}."""
    found = {}
    for node in pair.nodes:
        with open(node.log_path, errors="replace") as handle:
            text = handle.read()
        counts = {kind: text.count(kind) for kind in EVENTS if kind in text}
        if counts:
            found[node.name] = counts
    return found


def foreground(arguments, quiet):
    """Each measurement on a fresh set-up (the log only grows: a few sequential runs on one
    pair would fill the disk), deleted after it."""
    rows = []
    variants = ["alone-A", "alone-B", "both"]
    for rep in range(arguments.reps):
        order = variants[rep % 3:] + variants[:rep % 3]  # rotate: no variant always runs first
        for workload in WORKLOADS:
            for variant in order + ["solo"]:
                enough_space(arguments)
                with Pair(os.path.join(arguments.scratch, variant), peers=variant != "solo") as pair:
                    row = measure(pair, variant, workload, arguments, quiet)
                    row["log_events"] = log_events(pair)
                row["rep"] = rep + 1
                rows.append(row)
                say(f"rep {rep + 1}/{arguments.reps} {workload} {variant}: "
                    + ", ".join(f"{name} {row[name][FIGURE[workload][0]]:,.0f}" for name in ("A", "B") if name in row)
                    + f" (behind at end {sum(row['bytes_behind_at_end'].values()) / 1e6:,.0f} MB, catch-up "
                      f"{row['catch_up_seconds_after']} s, others {row['others_cpu_percent']} %"
                    + (f", logs {row['log_events']}" if row["log_events"] else "") + ")")
    return rows


# ---- (b) partition -------------------------------------------------------------------------

class Cut:
    """iptables DROP of TCP to the given local ports (both nodes' listeners), removed on exit."""

    def __init__(self, ports):
        self.rules = [["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"] for port in ports]
        self.active = False

    def __enter__(self):
        for rule in self.rules:
            subprocess.run(["iptables", "-I", *rule], check=True, env=ENVIRONMENT)
        self.active = True
        atexit.register(self.heal)
        return self

    def heal(self):
        if self.active:
            for rule in self.rules:
                subprocess.run(["iptables", "-D", *rule], check=False, env=ENVIRONMENT)
            self.active = False

    def __exit__(self, *exc):
        self.heal()


def write_sequential(uri, offset, length, failures):
    import nbd
    try:
        handle = nbd.NBD()
        handle.connect_uri(uri)
        data = os.urandom(MiB)
        for at in range(offset, offset + length, MiB):
            handle.pwrite(data[:8] + at.to_bytes(8, "little") + data[16:], at)
        handle.flush()
        handle.shutdown()
    except Exception as error:  # noqa: BLE001 - reported by the caller
        failures.append(error)


def volume_digest(node):
    import nbd
    handle = nbd.NBD()
    handle.connect_uri(node.uri())
    digest = hashlib.sha256()
    for offset in range(0, handle.get_size(), 8 * MiB):
        digest.update(handle.pread(8 * MiB, offset))
    handle.shutdown()
    return digest.hexdigest()


def partition(arguments, size_mib, hold_seconds):
    """One partition: returns the row of figures (times from the heal). For each direction,
    `resumes` is when the receiver's records_held first grows (its first batch applied) and
    `done` when it reaches the sender's last sequence at the heal."""
    enough_space(arguments)
    with Pair(os.path.join(arguments.scratch, "partition"), peers=True) as pair:
        a, b = pair.nodes
        other = {a.name: b, b.name: a}
        shipped_before = {node.name: node.shipped_bytes() for node in (a, b)}
        with Cut([a.port, b.port]):
            cut_at = time.monotonic()
            failures = []
            threads = [threading.Thread(target=write_sequential, args=(a.uri(), 0, size_mib * MiB, failures)),
                       threading.Thread(target=write_sequential, args=(b.uri(), HALF, size_mib * MiB, failures))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if failures:
                raise RuntimeError(f"writing during the partition failed: {failures}")
            write_seconds = time.monotonic() - cut_at
            wanted = {node.name: other[node.name].last_sequence() for node in (a, b)}
            time.sleep(max(0.0, hold_seconds - (time.monotonic() - cut_at)))
            held_seconds = time.monotonic() - cut_at
            shipped_at_heal = {node.name: node.shipped_bytes() for node in (a, b)}
        healed_at = time.monotonic()
        held_at_heal = {}  # each receiver's first reading after the heal (a heartbeat may slip in before the cut)
        resumes, done = {}, {}  # keyed by the SENDER's name
        while len(done) < 2:
            if time.monotonic() - healed_at > arguments.converge_timeout:
                raise RuntimeError(f"no convergence in {arguments.converge_timeout} s after the heal: "
                                   f"{a.log_tail()} {b.log_tail()}")
            for receiver in (a, b):
                sender = other[receiver.name].name
                if sender in done:
                    continue
                held = receiver.peer_row()["incoming"]["records_held"]
                now = round(time.monotonic() - healed_at, 2)
                held_at_heal.setdefault(receiver.name, held)
                if sender not in resumes and held > held_at_heal[receiver.name]:
                    resumes[sender] = now
                if held >= wanted[receiver.name]:
                    done[sender] = now
                    resumes.setdefault(sender, now)  # all of it arrived between two readings
            time.sleep(0.1)
        status_seconds = time.monotonic() - healed_at
        attempts = 0
        while True:
            attempts += 1
            digests = [volume_digest(node) for node in (a, b)]
            if digests[0] == digests[1] or time.monotonic() - healed_at > arguments.converge_timeout:
                break
            time.sleep(0.5)
        identical_seconds = time.monotonic() - healed_at
        shipped = {node.name: node.shipped_bytes() - shipped_at_heal[node.name] for node in (a, b)}
        row = {"size_mib_per_node": size_mib, "write_seconds": round(write_seconds, 2),
               "partition_seconds": round(held_seconds, 2),
               "shipped_during_partition": {node.name: shipped_at_heal[node.name] - shipped_before[node.name]
                                            for node in (a, b)},
               "resumes_after_heal_seconds": resumes, "done_after_heal_seconds": done,
               "status_converged_seconds": round(status_seconds, 2), "identical": digests[0] == digests[1],
               "identical_seconds": round(identical_seconds, 2), "digest_reads": attempts,
               "shipped_after_heal_bytes": shipped, "conflicts": a.json("peer", "status")["conflicts"].get(VOLUME),
               "log_events": log_events(pair),
               "logs": {node.name: [line for line in node.log_tail().splitlines() if "chunkvol:" in line][-6:]
                        for node in (a, b)}}
        return row


# ---- report --------------------------------------------------------------------------------

def median(values):
    return statistics.median(values) if values else None


def summarize(rows):
    """{workload: {(variant, node): median figure}}"""
    table = {}
    for workload, (key, _) in FIGURE.items():
        cells = {}
        for variant in ("alone-A", "alone-B", "both", "solo"):
            for name in ("A", "B"):
                values = [row[name][key] for row in rows if row["workload"] == workload
                          and row["variant"] == variant and name in row]
                if values:
                    cells[(variant, name)] = median(values)
        table[workload] = cells
    return table


def complaints(rows):
    """Summed log complaints over the runs, e.g. "too slow x2 (2 of 3 runs)"."""
    total, runs = {}, 0
    for row in rows:
        events = row.get("log_events") or {}
        runs += bool(events)
        for counts in events.values():
            for kind, count in counts.items():
                total[kind] = total.get(kind, 0) + count
    if not total:
        return "-"
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(total.items())) + f" ({runs} of {len(rows)} runs)"


def render(report):
    arguments = report["settings"]
    lines = [f"# chunkvol multi-master bench, {report['date']}", "",
             f"Two nodes of one pool on this machine ({report['cores']} vCPUs, shared with other work), "
             f"`chunkvol serve --listen` each, peers both ways, volume `mm` 1 GiB `--mode multi-master`; "
             f"A writes the first half, B the second. Commit {report['commit']}.", "",
             "## (a) Foreground: alone against both at once",
             "",
             f"nbdload (tools/bench/nbdload.py's generator limited to the node's half), one connection per node, "
             f"{arguments['reps']} fresh set-ups x {arguments['runtime']:.0f} s (+{arguments['ramp']:.0f} s ramp), "
             f"medians. `alone`: the other node idle but receiving; `both`: the two at the same time; "
             f"`no peers`: one pool without peers, the same workload on A's half.", ""]
    table = summarize(report["foreground"])
    lines += ["| workload | node | no peers | alone | both at once | both / alone |", "|---|---|---|---|---|---|"]
    for workload, (key, unit) in FIGURE.items():
        cells = table[workload]
        for name in ("A", "B"):
            alone, both = cells.get((f"alone-{name}", name)), cells.get(("both", name))
            solo = cells.get(("solo", "A")) if name == "A" else None
            lines.append(f"| {workload} ({unit}) | {name} | {f'{solo:,.0f}' if solo else '-'} | {alone:,.0f} | "
                         f"{both:,.0f} | {both / alone:.2f} |")
        if ("both", "A") in cells:
            total = cells[("both", "A")] + cells[("both", "B")]
            lines.append(f"| {workload} ({unit}) | A+B | | | {total:,.0f} | "
                         f"{total / ((cells[('alone-A', 'A')] + cells[('alone-B', 'B')]) / 2):.2f} of one alone |")
    lines += ["", "Replication during and after each run (medians): how far the writer's peer was behind when the "
                  "run ended (`peer status --json` outgoing.bytes_behind, summed over the writers), seconds from "
                  "the end of the run until each node holds everything, and the CPU of each node's serve session "
                  "(nbdkit with the receiver, and the shipper) during the run, % of one core.",
              "", "| workload | variant | behind at end MB | catch-up s | A cpu % | B cpu % | others' cpu % | "
                  "replication complaints in the logs |",
              "|---|---|---|---|---|---|---|---|"]
    for workload in FIGURE:
        for variant in ("alone-A", "alone-B", "both", "solo"):
            rows = [row for row in report["foreground"] if row["workload"] == workload and row["variant"] == variant]
            if not rows:
                continue
            behind = median([sum(row["bytes_behind_at_end"].values()) / 1e6 for row in rows])
            lines.append(f"| {workload} | {variant} | {behind:,.1f} | "
                         f"{median([r['catch_up_seconds_after'] for r in rows]):.1f} | "
                         f"{median([r['node_cpu_percent'].get('A', 0) for r in rows]):.0f} | "
                         + (f"{median([r['node_cpu_percent'].get('B', 0) for r in rows]):.0f}"
                            if variant != "solo" else "-")
                         + f" | {median([r['others_cpu_percent'] for r in rows]):.0f} | {complaints(rows)} |")
    lines += ["", "## (b) Convergence after a partition", "",
              f"iptables DROP on both replication ports; each node writes N MiB (sequential 1 MiB writes, one "
              f"flush) meanwhile; the cut is held {arguments['partition_seconds']:.0f} s (longer where the table "
              f"says), then removed. "
              f"Times from the heal.", "",
              "| MiB per node | partition s | A→B resumes s | A→B done s | B→A resumes s | B→A done s | "
              "both hold everything s | exports identical s | conflicts | replication complaints in the logs |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["partition"]:
        resumes, done = row["resumes_after_heal_seconds"], row["done_after_heal_seconds"]
        lines.append(f"| {row['size_mib_per_node']} | {row['partition_seconds']:.0f} | {resumes.get('A', '-')} | "
                     f"{done['A']} | {resumes.get('B', '-')} | {done['B']} | {row['status_converged_seconds']:.1f} | "
                     f"{row['identical_seconds']:.1f}{'' if row['identical'] else ' (NOT identical)'} | "
                     f"{row['conflicts']} | {complaints([row])} |")
    lines += ["", "Times from the heal. `A→B resumes`: B's `peer status --json` incoming.records_held first "
                  "grows (A's first batch applied there); `A→B done`: it reaches A's last sequence at the heal; "
                  "`both hold everything`: both directions done; `exports identical`: SHA-256 of the whole volume "
                  "read from each node's export matched (read once both hold everything; the two 1 GiB reads are "
                  "included). Each row is one run on a fresh pair."]
    notes = report.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    lines += ["", "Raw figures: the .json file beside this one. Command: `" + report["command"] + "`"]
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        return load_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", default=os.path.join(ROOT, "var", "bench-multimaster"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--runtime", type=float, default=8.0)
    parser.add_argument("--ramp", type=float, default=1.0)
    parser.add_argument("--sizes", default="16,64,256", help="MiB each node writes during a partition")
    parser.add_argument("--partition-seconds", type=float, default=10.0, help="hold the cut at least this long")
    parser.add_argument("--long-partitions", default="64:30,64:60,64:120",
                        help="extra rows MiB:SECONDS (a cut held longer), comma-separated; '' for none")
    parser.add_argument("--converge-timeout", type=float, default=600.0)
    parser.add_argument("--quiet-wait", type=float, default=20.0)
    parser.add_argument("--quiet-threshold", type=float, default=10.0)
    parser.add_argument("--quiet-budget", type=float, default=600.0)
    parser.add_argument("--min-free-gib", type=float, default=20.0, help="free space needed before a measurement")
    parser.add_argument("--skip-foreground", action="store_true")
    parser.add_argument("--skip-partition", action="store_true")
    parser.add_argument("--no-results", action="store_true", help="print, do not write docs/bench/")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the multi-master bench needs root (iptables)")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: sys.exit(130))
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "chunkvol",
                            "nbdkit_plugin"], capture_output=True, text=True).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
              "commit": commit + (" (with uncommitted changes in chunkvol/)" if dirty else ""),
              "settings": vars(arguments), "command": " ".join(["tools/bench/multimaster_bench.py"] + sys.argv[1:]),
              "foreground": [], "partition": []}
    quiet = Quiet(arguments)
    if not arguments.skip_foreground:
        report["foreground"] = foreground(arguments, quiet)
    if not arguments.skip_partition:
        plan = [(int(value), arguments.partition_seconds) for value in arguments.sizes.split(",") if value]
        plan += [(int(item.split(":")[0]), float(item.split(":")[1])) for item in arguments.long_partitions.split(",")
                 if item]
        for size, hold in plan:
            row = partition(arguments, size, hold)
            say(f"partition {size} MiB per node: {json.dumps({k: v for k, v in row.items() if k != 'logs'})}")
            report["partition"].append(row)
    text = render(report) if report["foreground"] else json.dumps(report["partition"], indent=1)
    print(text)
    if not arguments.no_results:
        out = os.path.join(ROOT, "docs", "bench", f"multimaster-{time.strftime('%Y%m%d-%H%M%S')}")
        with open(out + ".md", "w") as handle:
            handle.write(text)
        with open(out + ".json", "w") as handle:
            json.dump(report, handle, indent=2, default=str)
        say(f"results: {out}.md and {out}.json")
    shutil.rmtree(arguments.scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
