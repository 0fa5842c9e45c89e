"""Turning the run records into the Markdown report and the JSON file.

Why medians with (min-max): this VM shares its host, and single runs swing by 10-30 %
(see shared/research/perf-baseline.md). The median of the interleaved repetitions is the
figure; the range shows how far to trust it. Ratios are median / median, chunkvol over each
anchor, for the same workload in the same run.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

COPY_WORKLOADS = ["copy_in", "copy_out"]
DISTURBED_OTHER_CPU_PERCENT = 15.0


def _format_number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    if unit == "ratio":
        return f"{value:.2f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _stats(values: list[float]) -> dict | None:
    values = [value for value in values if value is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _cell(stats: dict | None, unit: str = "") -> str:
    if stats is None:
        return "–"
    if stats["n"] == 1:
        return _format_number(stats["median"], unit)
    return (f"{_format_number(stats['median'], unit)} "
            f"({_format_number(stats['min'], unit)}–{_format_number(stats['max'], unit)})")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


class Summary:
    """Medians over repetitions, per server and workload, of every figure in the records."""

    def __init__(self, records: list[dict], server_order: list[str], workload_columns: list[tuple[str, str, str]]):
        self.records = [record for record in records if "error" not in record]
        self.errors = [record for record in records if "error" in record]
        self.server_order = server_order
        self.workload_columns = workload_columns  # (name, label, unit)
        self.values = defaultdict(list)
        for record in self.records:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.values[(record["server"], record["workload"], key)].append(value)

    def stats(self, server: str, workload: str, key: str = "value") -> dict | None:
        return _stats(self.values.get((server, workload, key), []))

    def servers_with_data(self) -> list[str]:
        present = {record["server"] for record in self.records}
        return [server for server in self.server_order if server in present]

    def as_json(self) -> dict:
        keys = sorted({key for (_, _, key) in self.values})
        return {server: {workload: {key: self.stats(server, workload, key) for key in keys
                                    if self.stats(server, workload, key) is not None}
                         for workload, _, _ in self.workload_columns
                         if self.stats(server, workload) is not None}
                for server in self.servers_with_data()}

    def ratios(self, chunkvol_servers: list[str]) -> dict:
        """chunkvol median / anchor median for every workload both have."""
        ratios = {}
        for chunkvol in chunkvol_servers:
            per_anchor = {}
            for anchor in self.servers_with_data():
                if anchor == chunkvol:
                    continue
                row = {}
                for workload, _, _ in self.workload_columns:
                    mine, theirs = self.stats(chunkvol, workload), self.stats(anchor, workload)
                    if mine and theirs and theirs["median"]:
                        row[workload] = mine["median"] / theirs["median"]
                per_anchor[anchor] = row
            ratios[chunkvol] = per_anchor
        return ratios


def _metric_table(summary: Summary, key: str, unit: str = "", with_units: bool = False) -> list[str]:
    header = ["server"] + [f"{label} ({column_unit})" if with_units else label
                           for _, label, column_unit in summary.workload_columns]
    rows = []
    for server in summary.servers_with_data():
        rows.append([server] + [_cell(summary.stats(server, workload, key), unit)
                                for workload, _, _ in summary.workload_columns])
    return _table(header, rows)


def _machine_lines(meta: dict) -> list[str]:
    machine = meta["machine"]
    disk = machine["disk"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    return [
        f"- Date: {machine['date']}",
        f"- Machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_bytes'] / 2**30:.0f} GiB RAM, "
        f"kernel {machine['kernel']}",
        f"- Scratch disk: `{disk['path']}` on {disk['device']} ({disk['filesystem']}, {disk['mount_options']}; "
        f"model '{disk['model']}', {disk['size']}, rotational={disk['rotational']})",
        f"- Software: {versions}",
    ]


def _settings_lines(meta: dict) -> list[str]:
    settings = meta["settings"]
    return [
        f"- Command: `{meta['command']}`",
        f"- Export size {settings['size']}, {settings['reps']} repetitions interleaved across servers, "
        f"{settings['ramp_seconds']} s ramp + {settings['runtime_seconds']} s measured per workload, "
        f"written data {settings['compress_percent']} % compressible (fio buffer_compress_percentage)"
        + (" [--quick]" if settings["quick"] else ""),
        f"- Flush workload client: **{meta['flush_client']}** (exactly one flush per 32 writes; "
        "Debian's fio 3.33 sends a flush storm at iodepth>1, see docs/BENCH.md)",
        f"- nbdcopy image {settings['copy_size']}; pool-open log {settings['open_log_size']}; sustained write: "
        f"a fresh, empty export of {settings.get('sustained_size', '?')} per server and repetition, written once "
        "(1 MiB QD8) and flushed (fio end_fsync = one NBD FLUSH), MB/s counted until the flush returns",
    ]


def _flush_lines(summary: Summary, flush_workload: str) -> list[str]:
    rows = []
    for server in summary.servers_with_data():
        ratio = summary.stats(server, flush_workload, "writes_per_flush")
        if ratio is None:
            continue
        rows.append([server, _cell(ratio), _cell(summary.stats(server, flush_workload, "flush_lat_mean_us")),
                     _cell(summary.stats(server, flush_workload, "flush_lat_p99_us"))])
    if not rows:
        return []
    return ["", "### Flush check (flush workload)", ""] + _table(
        ["server", "writes per flush", "flush mean µs", "flush p99 µs"], rows)


def _server_lines(summary: Summary, lifecycles: list[dict]) -> list[str]:
    """One row per server for the io phase and one for the sustained write (its own fresh server)."""
    by_server = defaultdict(list)
    for lifecycle in lifecycles:
        if lifecycle.get("phase") in ("io", "sustained"):
            by_server[(lifecycle["server"], lifecycle["phase"])].append(lifecycle)
    rows = []
    for server in summary.server_order:
        for phase in ("io", "sustained"):
            runs = by_server.get((server, phase))
            if not runs:
                continue
            rss = _stats([run.get("peak_rss_bytes", 0) / 2**20 for run in runs])
            ready = _stats([run.get("ready_seconds") for run in runs])
            stop = _stats([run.get("stop_seconds") for run in runs])
            name = server if phase == "io" else f"{server} (sustained)"
            rows.append([name, runs[-1]["description"], _cell(rss), _cell(ready), _cell(stop)])
    return _table(["server", "what", "peak RSS MiB (VmHWM)", "start→first read s", "clean stop s"], rows)


def _sustained_lines(summary: Summary, sustained_workloads: list[str]) -> list[str]:
    """The sustained write next to its client's wall clock, and the page cache it started from."""
    lines = []
    for workload in sustained_workloads:
        rows = []
        for server in summary.servers_with_data():
            if summary.stats(server, workload) is None:
                continue
            mib = lambda key: _stats([value / 2**20 for value in summary.values.get((server, workload, key), [])])
            rows.append([server, _cell(summary.stats(server, workload)),
                         _cell(summary.stats(server, workload, "wall_mbps")),
                         _cell(summary.stats(server, workload, "measured_seconds")),
                         _cell(mib("cached_before_bytes")), _cell(mib("dirty_before_bytes")),
                         _cell(mib("mem_free_before_bytes")), _cell(mib("dirty_after_bytes"))])
        if not rows:
            continue
        lines += ["", f"### Sustained write ({workload})", "",
                  "A fresh, empty export per server and repetition, written once and flushed at the end "
                  "(fio `--end_fsync=1`: one NBD FLUSH, whose time is in fio's write runtime). MB/s = bytes / "
                  "that runtime; the wall column is bytes / the fio process's wall clock (connection included). "
                  "Before each run the harness syncs and drops no caches; the page cache then "
                  "(/proc/meminfo: the whole machine, MiB) and the dirty memory left when fio returned:", ""]
        lines += _table(["server", "MB/s (to the flush's return)", "MB/s (fio wall clock)", "seconds",
                         "cached before", "dirty before", "free before", "dirty after"], rows)
    return lines


def _open_notes(entry: dict) -> str:
    notes = []
    if "fill" in entry:
        notes.append(f"log written at {entry['fill']['iops']:,.0f} IOPS; clean stop after it "
                     f"{entry['fill_stop_seconds']:.2f} s")
    if entry.get("rebuild_note"):
        notes.append(entry["rebuild_note"])
    if entry.get("error"):
        notes.append("error: " + entry["error"].replace("|", "/")[:300])
    return "; ".join(notes)


def _open_lines(open_times: list[dict]) -> list[str]:
    if not open_times:
        return []
    lines = ["", "## chunkvol pool open time", "",
             "Time from starting nbdkit to the first successful 4 KiB NBD read.", ""]
    rows = []
    for entry in open_times:
        if entry.get("server") == "floor":
            rows.append(["floor (pymem, no store)", "–", _format_number(entry["seconds"]), "–", "–", "–"])
            continue
        if "error" in entry and not entry.get("checkpointed"):
            rows.append([entry["server"], "–", "error", "–", "–", entry["error"].replace("|", "/")[:200]])
            continue
        rows.append([
            entry["server"],
            f"{entry['log_bytes_written'] / 2**30:.2f} GiB written, {entry.get('log_bytes_on_disk', 0) / 2**30:.2f} GiB log",
            f"empty {_format_number(entry.get('empty_seconds'))}; checkpointed {_cell(_stats(entry['checkpointed']))}",
            _cell(_stats(entry["rebuild"])),
            _cell(_stats(entry.get("rebuild_mbps", []))),
            _open_notes(entry),
        ])
    lines += _table(["server", "log", "open s (checkpointed)", "open s (index deleted: rebuild)",
                     "rebuild MB/s of log", "notes"], rows)
    return lines


def _disturbed_lines(summary: Summary) -> list[str]:
    """How much other work ran beside each server's measurements (see docs/BENCH.md)."""
    by_server = defaultdict(list)
    for record in summary.records:
        if "other_cpu_percent" in record:
            by_server[record["server"]].append(record["other_cpu_percent"])
    disturbed = sum(1 for values in by_server.values() for value in values
                    if value >= DISTURBED_OTHER_CPU_PERCENT)
    if not disturbed:
        return ["", f"No measurement had other work using ≥{DISTURBED_OTHER_CPU_PERCENT:.0f} % of a core."]
    lines = ["", "## Other work on the machine", "",
             f"CPU used beside the measurement by everything outside the server and the client (busy CPU in "
             f"/proc/stat minus both; includes the kernel writing back dirty pages). {disturbed} measurements had "
             f"≥{DISTURBED_OTHER_CPU_PERCENT:.0f} % of a core of it; they stay in the medians, so re-run on a "
             "quieter machine if this table is not near zero. Per-run figures are in the JSON (`other_cpu_percent`).",
             ""]
    rows = []
    for server in summary.server_order:
        values = by_server.get(server)
        if not values:
            continue
        count = sum(1 for value in values if value >= DISTURBED_OTHER_CPU_PERCENT)
        rows.append([server, f"{count} / {len(values)}", _cell(_stats(values))])
    return lines + _table(["server", f"measurements with ≥{DISTURBED_OTHER_CPU_PERCENT:.0f} %",
                           "others, % of a core: median (min–max)"], rows)


def _command_lines(meta: dict, lifecycles: list[dict], records: list[dict]) -> list[str]:
    lines = ["", "## Exact commands", "", "Servers (last repetition; setup first):", "", "```"]
    last = {}
    for lifecycle in lifecycles:
        if "command" in lifecycle:
            last[(lifecycle["server"], lifecycle.get("phase"))] = lifecycle
    for (server, phase), lifecycle in last.items():
        lines.append(f"# {server} ({phase})")
        lines.extend(lifecycle.get("setup_commands", []))
        lines.append(lifecycle["command"])
    lines += ["```", "", "Workloads (one server's commands; the socket and export differ per server):", "", "```"]
    seen = set()
    for record in records:
        if record["workload"] in seen or "command" not in record:
            continue
        seen.add(record["workload"])
        lines.append(record["command"])
    lines.append("```")
    return lines


def render_markdown(meta: dict, summary: Summary, lifecycles: list[dict], open_times: list[dict],
                    skipped: dict[str, str], chunkvol_servers: list[str], flush_workload: str,
                    sustained_workloads: list[str] = ()) -> str:
    lines = ["# chunkvol benchmark", ""] + _machine_lines(meta) + _settings_lines(meta)
    if meta.get("interrupted"):
        lines += ["", "**Interrupted: partial results.**"]
    lines += ["", "## Throughput: median (min–max) over repetitions", "",
              "MB/s for sequential, prefill and nbdcopy columns; IOPS (4 KiB or 16 KiB requests) for random ones.",
              ""]
    lines += _metric_table(summary, "value", with_units=True)
    ratios = summary.ratios([server for server in chunkvol_servers if server in summary.servers_with_data()])
    for chunkvol, per_anchor in ratios.items():
        lines += ["", f"### {chunkvol} / anchor (ratio of medians; >1 means chunkvol is faster)", ""]
        header = ["anchor"] + [label for _, label, _ in summary.workload_columns]
        rows = [[anchor] + [_format_number(row.get(workload), "ratio") for workload, _, _ in summary.workload_columns]
                for anchor, row in per_anchor.items()]
        lines += _table(header, rows)
    lines += ["", "## Server CPU", "", "µs of server CPU (utime+stime from /proc, all threads) per request:", ""]
    lines += _metric_table(summary, "server_cpu_us_per_op")
    lines += ["", "Server CPU, % of one core:", ""]
    lines += _metric_table(summary, "server_cpu_percent")
    lines += ["", "Client (fio / nbdload / nbdcopy) CPU, % of one core:", ""]
    lines += _metric_table(summary, "client_cpu_percent")
    lines += ["", "## Latency", "", "Mean completion latency, µs (the main direction):", ""]
    lines += _metric_table(summary, "lat_mean_us")
    lines += ["", "p99 completion latency, µs:", ""]
    lines += _metric_table(summary, "lat_p99_us")
    lines += _flush_lines(summary, flush_workload)
    lines += _sustained_lines(summary, list(sustained_workloads))
    lines += ["", "## Servers", ""] + _server_lines(summary, lifecycles)
    lines += _open_lines(open_times)
    if skipped or summary.errors:
        lines += ["", "## Skipped and failed", ""]
        lines += [f"- {server} skipped: {reason}" for server, reason in skipped.items()]
        lines += [f"- rep {record['rep']} {record['server']} {record['workload']} failed: {record['error']}"
                  for record in summary.errors]
    lines += _disturbed_lines(summary)
    lines += _command_lines(meta, lifecycles, summary.records + summary.errors)
    return "\n".join(lines) + "\n"
