"""`make bench-mirror`: what a mirror over a slow link costs the foreground, and what it holds.

For each repetition, interleaved, on a fresh pool served by `chunkvol serve` (nbdkit and the
shipper process, as a user runs it):

- `none`: no mirror.
- `slow`: a mirror to another node of the pool in a network namespace behind a veth pair
  shaped by `tc tbf` (--rate, default 16 Mbit/s) with 1 % random drop (tools/netlab.py).

Workloads (tools/bench/nbdload.py, one connection): random 4 KiB writes QD16 with a flush every
32, and sequential 1 MiB writes QD8. Then, with the slow mirror, the source is written until
the mirror is --behind bytes behind (default 1 GiB), and the peak RSS of the server, the
shipper and the receiver is read while it is that far behind; then the mirror is left to
catch up for a while and its catch-up rate is compared with the link rate.

Prints a Markdown table of medians and writes the same as JSON beside it. Needs root.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tools.netlab import SlowLink  # noqa: E402

CHUNKVOL = os.path.join(ROOT, ".venv", "bin", "chunkvol")
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
NBDLOAD = os.path.join(ROOT, "tools", "bench", "nbdload.py")
ENVIRONMENT = dict(os.environ, PATH="/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
PORT = 10911


def cv(pool, *arguments):
    return subprocess.run([CHUNKVOL, "--pool", pool, *arguments], check=True, capture_output=True, text=True,
                          env=ENVIRONMENT).stdout


def wait_for(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def can_connect(address):
    try:
        if isinstance(address, str):
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(address)
        else:
            socket.create_connection(address, timeout=1).close()
        return True
    except OSError:
        return False


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def pids_matching(pattern):
    found = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def nbdload(socket_path, *arguments):
    result = subprocess.run([PYTHON, NBDLOAD, "--uri", f"nbd+unix:///v?socket={socket_path}", *arguments],
                            check=True, capture_output=True, text=True, env=ENVIRONMENT)
    return json.loads(result.stdout)


class Setup:
    def __init__(self, scratch, mirrored, rate):
        self.scratch, self.mirrored, self.rate = scratch, mirrored, rate
        self.source = os.path.join(scratch, "source")
        self.socket = os.path.join(scratch, "nbd.sock")
        self.link = None
        self.serve = None

    def __enter__(self):
        shutil.rmtree(self.scratch, ignore_errors=True)
        os.makedirs(self.scratch)
        cv(self.source, "init", "--chunk-size", "1G")
        cv(self.source, "volume", "create", "v", "--size", "4G")
        if self.mirrored:
            join = os.path.join(self.scratch, "node.join")
            node = os.path.join(self.scratch, "node")
            cv(self.source, "join-file", join)
            cv(node, "init", "--join", join)
            self.link = SlowLink(rate=self.rate, loss=0.01).__enter__()
            self.receiver_log = open(os.path.join(self.scratch, "receiver.log"), "wb")
            self.receiver = self.link.run([CHUNKVOL, "--pool", node, "receive", "--listen",
                                           f"{self.link.inner}:{PORT}"], env=ENVIRONMENT,
                                          stdout=self.receiver_log, stderr=self.receiver_log)
            wait_for(lambda: can_connect((self.link.inner, PORT)), 20, "the receiver")
            cv(self.source, "mirror", "add", "far", "--to", f"node:{self.link.inner}:{PORT}")
        self.serve = subprocess.Popen([CHUNKVOL, "--pool", self.source, "serve", "--socket", self.socket],
                                      env=ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
        wait_for(lambda: can_connect(self.socket), 30, "the server")
        return self

    def check_shipping(self):
        """The mirror must really be shipping, or the figures mean nothing."""
        row = json.loads(cv(self.source, "mirror", "status", "far", "--json"))
        if not row["shipped_bytes"] or row["last_error"]:
            with open(os.path.join(self.scratch, "receiver.log")) as handle:
                raise SystemExit(f"the mirror is not shipping: {row}\nreceiver: {handle.read()[-2000:]}")
        return row

    def __exit__(self, *exc):
        if self.serve is not None and self.serve.poll() is None:
            os.killpg(self.serve.pid, signal.SIGTERM)
            self.serve.wait(timeout=120)
        if self.link is not None:
            self.link.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def measure_foreground(arguments, mirrored):
    with Setup(arguments.scratch, mirrored, arguments.rate) as setup:
        random_writes = nbdload(setup.socket, "--rw", "randwrite", "--bs", "4096", "--iodepth", "16",
                                "--flush-every", "32", "--runtime", str(arguments.runtime))
        sequential = nbdload(setup.socket, "--rw", "write", "--bs", str(1 << 20), "--iodepth", "8",
                             "--runtime", str(arguments.runtime))
        if mirrored:
            setup.check_shipping()
        return {"randwrite_flush32_iops": random_writes["iops"], "seqwrite_mb_s": sequential["mbps"]}


def measure_behind(arguments):
    behind_target = arguments.behind
    with Setup(arguments.scratch, True, arguments.rate) as setup:
        written = 0
        while True:
            nbdload(setup.socket, "--rw", "write", "--bs", str(1 << 20), "--iodepth", "8", "--runtime", "3",
                    "--ramp", "0")
            row = json.loads(cv(setup.source, "mirror", "status", "far", "--json"))
            written = row["bytes_behind"]
            if written >= behind_target:
                break
        figures = {"bytes_behind": row["bytes_behind"], "records_behind": row["records_behind"],
                   "seconds_behind": row["seconds_behind"],
                   "server_rss_mib": round(rss_kib(pids_matching(f"chunkvol_plugin.py pool={setup.source}")) / 1024, 1),
                   "shipper_rss_mib": round(rss_kib(pids_matching(f"--pool {setup.source} mirror run")) / 1024, 1),
                   "receiver_rss_mib": round(rss_kib([setup.receiver.pid] + pids_matching("receive --listen")) / 1024, 1)}
        start_row = setup.check_shipping()
        time.sleep(arguments.catch_up_seconds)
        end_row = setup.check_shipping()
        shipped = end_row["shipped_bytes"] - start_row["shipped_bytes"]
        figures["catch_up_bytes_per_second"] = round(shipped / arguments.catch_up_seconds)
        return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", default=os.path.join(ROOT, "var", "bench-mirror"))
    parser.add_argument("--rate", default="16mbit", help="tc tbf rate of the link (default 16mbit)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--runtime", type=float, default=8.0)
    parser.add_argument("--behind", type=int, default=1 << 30, help="bytes behind for the memory figure")
    parser.add_argument("--catch-up-seconds", type=float, default=30.0)
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench-mirror needs root (network namespaces)")
    runs = {"none": [], "slow": []}
    for rep in range(arguments.reps):
        for variant in ("none", "slow"):
            result = measure_foreground(arguments, variant == "slow")
            runs[variant].append(result)
            print(f"rep {rep + 1}/{arguments.reps} {variant}: {result}", flush=True)
    behind = measure_behind(arguments)
    print(f"behind: {behind}", flush=True)
    medians = {variant: {key: statistics.median(run[key] for run in results) for key in results[0]}
               for variant, results in runs.items()}
    rate_bits = float(arguments.rate.lower().replace("mbit", "e6").replace("kbit", "e3"))
    link_bytes = rate_bits / 8
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rate": arguments.rate,
              "link_bytes_per_second": link_bytes, "runs": runs, "medians": medians, "behind": behind,
              "catch_up_vs_link": round(behind["catch_up_bytes_per_second"] / link_bytes, 3)}
    lines = [f"# chunkvol mirror bench, {report['date']}", "",
             f"Link: tc tbf {arguments.rate}, 1 % drop, to a node in a network namespace; "
             f"{arguments.reps} repetitions of {arguments.runtime:.0f} s, medians.", "",
             "| | rand write 4 KiB QD16 + flush/32 (IOPS) | seq write 1 MiB QD8 (MB/s) |", "|---|---|---|"]
    for variant, label in (("none", "no mirror"), ("slow", "mirror over the slow link")):
        lines.append(f"| {label} | {medians[variant]['randwrite_flush32_iops']:,.0f} | "
                     f"{medians[variant]['seqwrite_mb_s']:,.0f} |")
    for key in ("randwrite_flush32_iops", "seqwrite_mb_s"):
        lines.append(f"\nslow / none, {key}: {medians['slow'][key] / medians['none'][key]:.3f}")
    lines += ["", f"While {behind['bytes_behind'] / (1 << 30):.2f} GiB ({behind['records_behind']:,} records, "
                  f"{behind['seconds_behind']:.0f} s) behind: server peak RSS {behind['server_rss_mib']} MiB, "
                  f"shipper {behind['shipper_rss_mib']} MiB, receiver {behind['receiver_rss_mib']} MiB.",
              f"Catch-up: {behind['catch_up_bytes_per_second'] / 1e6:.2f} MB/s on a "
              f"{link_bytes / 1e6:.2f} MB/s link ({report['catch_up_vs_link']:.2f} of the link)."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(ROOT, "docs", "bench", f"mirror-{time.strftime('%Y%m%d-%H%M%S')}")
    with open(out + ".md", "w") as handle:
        handle.write(text)
    with open(out + ".json", "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"results: {out}.md and {out}.json")


if __name__ == "__main__":
    main()
