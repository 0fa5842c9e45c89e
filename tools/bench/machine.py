"""What the numbers were measured on: CPU, cores, memory, kernel, the scratch disk, versions.

Why: these results are ratios on one machine at one moment (a 2-vCPU VM with a host-cached
disk here), and are meaningless without the machine next to them.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from commands import tool_environment


def _first_line(argv: list[str]) -> str:
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, env=tool_environment(), check=False)
    except FileNotFoundError:
        return "not installed"
    text = (completed.stdout or completed.stderr).strip()
    return text.splitlines()[0] if text else ""


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _disk(path: Path) -> dict:
    """The filesystem and block device under ``path`` (findmnt/lsblk), best effort."""
    source, fstype, options = (_first_line(["findmnt", "-T", str(path), "-no", "SOURCE,FSTYPE,OPTIONS"]).split()
                               + ["", "", ""])[:3]
    device = Path(source).name
    rotational = Path(f"/sys/block/{device}/queue/rotational")
    model = Path(f"/sys/block/{device}/device/model")
    return {
        "path": str(path),
        "device": source,
        "filesystem": fstype,
        "mount_options": options,
        "model": model.read_text().strip() if model.exists() else "",
        "rotational": rotational.read_text().strip() == "1" if rotational.exists() else None,
        "size": _first_line(["lsblk", "-dno", "SIZE", source]) if source.startswith("/dev/") else "",
    }


def _writeback_settings() -> dict:
    """The kernel's dirty-page limits: how much a store that writes through the page cache may
    hold back before the kernel makes it wait (matters for the sustained write)."""
    settings = {}
    for name in ("dirty_ratio", "dirty_background_ratio", "dirty_bytes", "dirty_background_bytes",
                 "dirty_expire_centisecs"):
        try:
            settings[name] = int(Path(f"/proc/sys/vm/{name}").read_text())
        except (OSError, ValueError):
            pass
    return settings


def _libnbd_version() -> str:
    import nbd
    return nbd.NBD().get_version()


def describe(scratch: Path) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "kernel": platform.release(),
        "disk": _disk(scratch),
        "writeback": _writeback_settings(),
        "versions": {
            "nbdkit": _first_line(["nbdkit", "--version"]),
            "qemu-nbd": _first_line(["qemu-nbd", "--version"]),
            "fio": _first_line(["fio", "--version"]),
            "libnbd": _libnbd_version(),
            "nbdkit python": _first_line(["/usr/bin/python3", "--version"]),
            "harness python": platform.python_version(),
        },
    }
