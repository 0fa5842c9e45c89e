"""`chunkvol history`, `chunkvol snapshot ...` and `chunkvol prune`: a volume's past."""

import contextlib
import json
import os
import sys

from chunkvol import diff_transfer, history
from chunkvol.cli.common import open_pool_for_reading, pool_is_busy, run_operation
from chunkvol.cli.progress import progress_bar
from chunkvol.cli.sizes import format_size
from chunkvol.errors import PoolBusyError, UsageError
from chunkvol.pool import Pool

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text):
    """'90s', '15m', '1h', '7d', '2w' or '0' -> seconds."""
    text = str(text).strip().lower()
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS else (text, "s")
    if not number.isdigit():
        raise UsageError(f"invalid duration {text!r}: use a number with s, m, h, d or w (e.g. 1h, 0s)")
    return int(number) * _UNITS[unit]


def register(commands):
    show = commands.add_parser("history", help="a volume's flush points: times and bytes written")
    show.add_argument("volume")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=history_command)

    snapshot = commands.add_parser("snapshot", help="snapshots: create, list, remove, rollback, clone, diff")
    verbs = snapshot.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    create = verbs.add_parser("create", help="snapshot volumes now (O(1): nothing is copied)")
    create.add_argument("points", nargs="+", metavar="VOL@NAME")
    create.set_defaults(run=create_command)
    listing = verbs.add_parser("list", aliases=["ls"], help="a volume's snapshots")
    listing.add_argument("volume")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=list_command)
    remove = verbs.add_parser("remove", aliases=["rm"], help="remove a snapshot")
    remove.add_argument("point", metavar="VOL@NAME")
    remove.set_defaults(run=remove_command)
    rollback = verbs.add_parser("rollback", help="make the live volume show a past point again")
    rollback.add_argument("point", metavar="VOL@NAME|VOL@TIME")
    rollback.set_defaults(run=rollback_command)
    clone = verbs.add_parser("clone", help="a new writable volume sharing a snapshot's blocks")
    clone.add_argument("point", metavar="VOL@NAME")
    clone.add_argument("name", metavar="NEWVOL")
    clone.set_defaults(run=clone_command)
    diff = verbs.add_parser("diff", help="byte ranges changed between two points (B: the live volume)")
    diff.add_argument("start", metavar="VOL@A")
    diff.add_argument("end", nargs="?", metavar="VOL@B")
    diff.add_argument("--json", action="store_true")
    diff.set_defaults(run=diff_command)
    export = verbs.add_parser("export-diff", help="write the changes up to a point as a stream")
    export.add_argument("point", metavar="VOL@B")
    export.add_argument("file", metavar="FILE", help="output file, or - for stdout")
    export.add_argument("--from-snap", metavar="A", help="only the changes since snapshot A (default: everything)")
    export.set_defaults(run=export_command)
    import_ = verbs.add_parser("import-diff", help="apply a stream from export-diff to a volume")
    import_.add_argument("file", metavar="FILE", help="input file, or - for stdin")
    import_.add_argument("volume")
    import_.set_defaults(run=import_command)

    prune = commands.add_parser("prune", help="release history older than a duration, or by the retention policy")
    prune.add_argument("volumes", nargs="*", metavar="VOL", help="volumes (default: all)")
    prune.add_argument("--keep", help="keep every point of the last DURATION (e.g. 1h, 0s); "
                                      "default: the pool's retention policy")
    prune.set_defaults(run=prune_command)

    retention = commands.add_parser("retention", help="show or set the history retention policy")
    retention.add_argument("--all", metavar="DURATION", help="keep every flush point this long (default 1h)")
    retention.add_argument("--hourly", metavar="DURATION", help="then the last point of each hour (default 1d)")
    retention.add_argument("--daily", metavar="DURATION", help="then the last point of each day (default 30d)")
    retention.add_argument("--json", action="store_true")
    retention.set_defaults(run=retention_command)


def history_command(arguments):
    with open_pool_for_reading(arguments.pool) as pool:
        rows = history.history_rows(pool, arguments.volume)
    if arguments.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'TIME (UTC)':<25} {'WRITTEN':>11}  POINT")
    for row in rows:
        print(f"{row['time']:<25} {format_size(row['bytes_written']):>11}  {row['point']}")


def create_command(arguments):
    for made in run_operation(arguments.pool, "snapshot_create", points=arguments.points):
        print(f"created snapshot {made['point']} ({made['time']})")


def list_command(arguments):
    with open_pool_for_reading(arguments.pool) as pool:
        rows = history.snapshot_rows(pool, arguments.volume)
        peers = bool(pool.peer_nodes)
    if arguments.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'NAME':<24} {'TIME (UTC)':<25} {'SIZE':>11} {'UNIQUE':>11}" + ("  COMPLETE" if peers else ""))
    for row in rows:
        complete = ""
        if peers:  # with peers: are all their records up to the snapshot here?
            complete = "  yes" if not row["waiting_for"] else \
                "  no: waiting for node " + ", ".join(str(node) for node in row["waiting_for"])
        print(f"{row['name']:<24} {row['time']:<25} {format_size(row['size']):>11} "
              f"{format_size(row['unique_bytes']):>11}{complete}")


def remove_command(arguments):
    run_operation(arguments.pool, "snapshot_remove", point=arguments.point)
    print(f"removed snapshot {arguments.point}")


def rollback_command(arguments):
    result = run_operation(arguments.pool, "snapshot_rollback", point=arguments.point)
    print(f"rolled back {arguments.point.partition('@')[0]} to {arguments.point}; "
          f"to undo: chunkvol snapshot rollback {result['undo_with']}")


def clone_command(arguments):
    info = run_operation(arguments.pool, "snapshot_clone", point=arguments.point, name=arguments.name)
    print(f"cloned {arguments.point} as volume {info['name']} ({format_size(info['size'])})")


def diff_command(arguments):
    with open_pool_for_reading(arguments.pool) as pool:
        changes = history.diff(pool, arguments.start, arguments.end)
    if arguments.json:
        print(json.dumps([{"offset": offset, "length": length, "data": data} for offset, length, data in changes]))
        return
    for offset, length, data in changes:
        print(f"{offset:>16} {length:>12} {'data' if data else 'zero'}")
    total = sum(length for _, length, _ in changes)
    print(f"{len(changes)} extents, {format_size(total)} changed", file=sys.stderr)


def export_command(arguments):
    from_spec = None
    if arguments.from_snap:
        from_spec = f"{arguments.point.partition('@')[0]}@{arguments.from_snap}"
    out = sys.stdout.buffer if arguments.file == "-" else None
    with open_pool_for_reading(arguments.pool) as pool:
        if out is None:
            temporary = arguments.file + ".part"
            try:
                with open(temporary, "wb") as out_file, progress_bar(None, "exporting") as advance:
                    stats = diff_transfer.export_diff(pool, arguments.point, from_spec, out_file, advance)
                    out_file.flush()
                    os.fsync(out_file.fileno())
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise
            os.rename(temporary, arguments.file)  # a finished stream or none
        else:
            stats = diff_transfer.export_diff(pool, arguments.point, from_spec, out)
    print(f"exported {arguments.point}{' since ' + arguments.from_snap if from_spec else ''}: "
          f"{stats['entries']} extents, {format_size(stats['data_bytes'])} of data, "
          f"{format_size(stats['stream_bytes'])} stream", file=sys.stderr)


def import_command(arguments):
    if pool_is_busy(arguments.pool):
        raise PoolBusyError("import-diff writes into the pool directly: stop its server first "
                            "(or import into a pool that is not being served)")
    source = sys.stdin.buffer if arguments.file == "-" else open(arguments.file, "rb")
    try:
        with Pool.open(arguments.pool) as pool, progress_bar(None, "importing") as advance:
            stats = diff_transfer.import_diff(pool, source, arguments.volume, advance,
                                              name="stdin" if arguments.file == "-" else arguments.file)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    print(f"imported {stats['entries']} extents ({format_size(stats['data_bytes'])} of data) into "
          f"{arguments.volume}" + (f"; created snapshot {stats['snapshot']}" if stats["snapshot"] else ""))


def prune_command(arguments):
    keep = parse_duration(arguments.keep) if arguments.keep is not None else None
    released = run_operation(arguments.pool, "prune", volumes=arguments.volumes, keep_seconds=keep)
    for name, count in released.items():
        print(f"{name}: released {count} flush points")


def retention_command(arguments):
    values = {key: parse_duration(getattr(arguments, key)) if getattr(arguments, key) is not None else None
              for key in ("all", "hourly", "daily")}
    policy = run_operation(arguments.pool, "retention", all_seconds=values["all"],
                           hourly_seconds=values["hourly"], daily_seconds=values["daily"])
    if arguments.json:
        print(json.dumps(policy))
        return
    print(f"every flush point for {_duration(policy['all'])}, the last of each hour for "
          f"{_duration(policy['hourly'])}, the last of each day for {_duration(policy['daily'])}; "
          "snapshots until removed")


def _duration(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
