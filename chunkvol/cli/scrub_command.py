"""`chunkvol scrub`: verify every record; heal damaged live ones from a mirror (safe while serving)."""

import json

from chunkvol import control, heal
from chunkvol.cli.common import pool_is_busy
from chunkvol.cli.progress import progress_bar
from chunkvol.errors import CorruptionError
from chunkvol.pool import Pool


def register(commands):
    scrub = commands.add_parser("scrub", help="verify every record; heal damaged ones from a mirror")
    scrub.add_argument("--json", action="store_true")
    scrub.set_defaults(run=scrub_command)


def scrub_command(arguments):
    if pool_is_busy(arguments.pool):
        report = control.call(arguments.pool, "scrub")
    else:
        with Pool.open(arguments.pool) as pool:
            total = sum(pool.chunks.get(chunk_id).size_bytes for chunk_id in pool.chunks.ids())
            with progress_bar(total, "scrubbing", enabled=not arguments.json) as advance:
                report = heal.scrub(pool, advance)
    if arguments.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"scrubbed {report['records']} records ({report['bytes']} bytes): {report['damaged']} damaged, "
              f"{len(report['healed'])} healed from mirrors, {len(report['not_healed'])} not healed, "
              f"{len(report['damaged_but_unused'])} damaged but no longer used")
        for row in report["healed"]:
            print(f"  healed {row['record']} from mirror {row['from']} ({row['problem']})")
        for row in report["not_healed"]:
            print(f"  NOT healed {row['record']}: no mirror has a good copy ({row['problem']}); reads of it fail")
    if report["not_healed"]:
        raise CorruptionError(f"{len(report['not_healed'])} damaged records could not be healed")
