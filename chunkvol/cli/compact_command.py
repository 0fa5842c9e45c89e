"""`chunkvol compact`: free mostly-dead chunks by copying their live records to the log's tail."""

import json

from chunkvol import compaction, control
from chunkvol.cli.common import pool_is_busy
from chunkvol.cli.progress import progress_bar
from chunkvol.cli.sizes import format_size
from chunkvol.pool import Pool


def register(commands):
    compact = commands.add_parser("compact", help="free chunks that are mostly dead (safe while serving)")
    compact.add_argument("--min-dead", type=float, default=compaction.DEFAULT_MIN_DEAD,
                         help="compact chunks at least this share dead (default 0.5)")
    compact.add_argument("--json", action="store_true")
    compact.set_defaults(run=compact_command)


def compact_command(arguments):
    if pool_is_busy(arguments.pool):
        report = control.call(arguments.pool, "compact", min_dead=arguments.min_dead)
    else:
        with Pool.open(arguments.pool) as pool, progress_bar(None, "copying live records",
                                                            enabled=not arguments.json) as advance:
            report = compaction.compact(pool, arguments.min_dead, advance)
    if arguments.json:
        print(json.dumps(report, indent=2))
        return
    if not report["victims"]:
        print(f"nothing to compact: no sealed chunk is {arguments.min_dead:.0%} dead")
    else:
        rate = report["copied_bytes"] / report["seconds"] / 1e6 if report["seconds"] else 0.0
        print(f"freed {len(report['victims'])} chunks ({format_size(report['freed_bytes'])}); copied "
              f"{report['copied_records']} live records ({format_size(report['copied_bytes'])}) "
              f"in {report['seconds']:.1f} s ({rate:.0f} MB/s)")
    if report["store_objects_deleted"]:
        print(f"deleted {report['store_objects_deleted']} objects of evicted chunks from their object store")
    for left in report["store_objects_left"]:
        print(f"objects of evicted chunk {left['chunk']} stay in {left['store']}: {left['error']}")
    for skipped in report["skipped"]:
        print(f"left chunk {skipped['chunk']} alone: {skipped['reason']}")
