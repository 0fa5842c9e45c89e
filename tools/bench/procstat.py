"""Readers for /proc: server CPU time, peak RSS and whole-machine CPU use.

Why from /proc: qemu-nbd and nbdkit are separate processes that we do not control, and the
only way to charge CPU and memory to a server (and not to fio or the harness) is to read the
kernel's own counters for its PID. The figures are summed over the server process and any
children it has (nbdkit's Python plugin runs in threads of one process; the sum also covers
a plugin that forks helpers).
"""

from __future__ import annotations

import os
import time

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _read_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            text = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def process_tree(root_pid: int) -> list[int]:
    """The PID and all its living descendants."""
    children_of: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _read_stat_fields(int(entry))
        if fields is None:
            continue
        children_of.setdefault(int(fields[1]), []).append(int(entry))
    tree, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children_of.get(pid, []))
    return tree


def cpu_seconds(root_pid: int) -> float:
    """utime + stime of the process tree (all threads), in seconds."""
    total_ticks = 0
    for pid in process_tree(root_pid):
        fields = _read_stat_fields(pid)
        if fields is not None:
            # After the name: state(0) ppid(1) ... utime(11) stime(12).
            total_ticks += int(fields[11]) + int(fields[12])
    return total_ticks / CLOCK_TICKS_PER_SECOND


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status_file:
            for line in status_file:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def peak_rss_bytes(root_pid: int) -> int:
    """Sum of VmHWM (peak resident set) over the process tree, in bytes."""
    return 1024 * sum(_status_kib(pid, "VmHWM") for pid in process_tree(root_pid))


def rss_bytes(root_pid: int) -> int:
    """Sum of VmRSS (current resident set) over the process tree, in bytes."""
    return 1024 * sum(_status_kib(pid, "VmRSS") for pid in process_tree(root_pid))


PAGE_CACHE_FIELDS = {"Cached": "cached", "Dirty": "dirty", "Writeback": "writeback", "MemFree": "mem_free"}


def page_cache_bytes() -> dict[str, int]:
    """The page cache right now, from /proc/meminfo: cached, dirty, writeback, mem_free (bytes)."""
    found = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            key = line.split(":", 1)[0]
            if key in PAGE_CACHE_FIELDS:
                found[PAGE_CACHE_FIELDS[key]] = int(line.split()[1]) * 1024
    return found


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle by all cores since boot (from the 'cpu' line of /proc/stat).

    The difference over a run, minus the server's and the client's CPU, is the CPU used by
    everything else on the machine: a run where that is high was disturbed.
    """
    with open("/proc/stat") as stat_file:
        fields = stat_file.readline().split()
    ticks = [int(value) for value in fields[1:]]
    idle_ticks = ticks[3] + ticks[4]  # idle + iowait
    # guest and guest_nice (fields 9, 10) are already counted in user and nice.
    busy_ticks = sum(ticks[:8]) - idle_ticks
    return busy_ticks / CLOCK_TICKS_PER_SECOND


def others_cpu_percent(sample_seconds: float = 1.0) -> float:
    """% of one core used by processes outside this process's tree over ``sample_seconds``.

    The harness, the server it started and the client are all in that tree (the server is
    its child even in its own session), so what remains is other people's work.
    """
    own_pid = os.getpid()
    busy_before, own_before = machine_busy_seconds(), cpu_seconds(own_pid)
    time.sleep(sample_seconds)
    busy = machine_busy_seconds() - busy_before
    own = cpu_seconds(own_pid) - own_before
    return max(0.0, 100.0 * (busy - own) / sample_seconds)
