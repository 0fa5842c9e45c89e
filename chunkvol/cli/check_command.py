"""`chunkvol check [--repair]`: verify every record and the block map against the log."""

import json
import os

from chunkvol.check import check_pool, rebuild_index
from chunkvol.cli.common import pool_is_busy
from chunkvol.cli.progress import progress_bar
from chunkvol.errors import CorruptionError, PoolBusyError
from chunkvol.pool import Pool


def register(commands):
    check = commands.add_parser("check", help="verify every record's checksum and the block map")
    check.add_argument("--repair", action="store_true", help="rebuild the block map from the log")
    check.add_argument("--json", action="store_true")
    check.set_defaults(run=check_command)


def check_command(arguments):
    path = os.path.abspath(arguments.pool)
    Pool.read_metadata(path)
    busy = pool_is_busy(path)
    if arguments.repair and busy:
        raise PoolBusyError("check --repair needs the pool to itself: stop the server first")
    total = sum(os.path.getsize(os.path.join(d, f)) for d in _chunk_dirs(path) for f in os.listdir(d))
    rebuilt_first = False
    with progress_bar(total, "checking log", enabled=not arguments.json) as advance:
        try:
            report = check_pool(path, busy, progress=advance)
        except CorruptionError as error:
            if not arguments.repair:
                raise CorruptionError(f"{error}; `check --repair` rebuilds the block map from the log") from None
            rebuild_index(path)  # the map cannot even be opened: rebuild it, then check
            rebuilt_first = True
            report = check_pool(path, busy, progress=advance)
    if rebuilt_first:
        report["repaired"] = True
    if arguments.repair and report["map_differences"]:
        rebuild_index(path)
        report["repaired"] = True
    if arguments.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"checked {report['records']} records, {report['log_bytes']} bytes of log in {report['seconds']} s")
        for damage in report["log_damage"]:
            print(f"DAMAGED record in {damage['file']} at offset {damage['offset']}: {damage['error']}")
        for difference in report["map_differences"]:
            print(f"BLOCK MAP: {difference}")
        if report.get("repaired"):
            print("block map rebuilt from the log")
        if not report["log_damage"] and not report["map_differences"]:
            print("no damage found")
    if report["log_damage"] or (report["map_differences"] and not report.get("repaired")):
        raise CorruptionError(f"{len(report['log_damage'])} damaged record(s), "
                              f"{len(report['map_differences'])} block map difference(s)"
                              + ("" if report.get("repaired") else "; `check --repair` rebuilds the block map"))


def _chunk_dirs(path):
    fields = Pool.read_metadata(path)
    return [os.path.join(path, d) for d in fields["chunk_dirs"]]
