"""`chunkvol restore --from rados:...|s3:... --pool PATH [--until TIME]`: a whole pool from an
object store alone (chunkvol/restore.py)."""

import argparse
import json
import sys

from tqdm import tqdm

from chunkvol import history, restore
from chunkvol.cli.sizes import format_size
from chunkvol.objstore.keys import load_key


def register(commands):
    parser = commands.add_parser("restore", help="rebuild a whole pool from an object store mirror")
    parser.add_argument("--from", dest="source", required=True, metavar="rados:CONF:POOL|s3:URL/BUCKET")
    parser.add_argument("--pool", dest="pool", default=argparse.SUPPRESS, metavar="NEWPATH",
                        help="where to create the pool (or chunkvol --pool NEWPATH restore ...)")
    parser.add_argument("--until", metavar="TIME", help="stop at the last flush point at or before this UTC time")
    parser.add_argument("--pool-uuid", help="which pool, when the store holds several")
    parser.add_argument("--key", metavar="PATH", help="the key file of an encrypted mirror (`mirror add --key`)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run=restore_command)


def restore_command(arguments):
    until = history.stamp_of_time(arguments.until) if arguments.until else None
    key = load_key(arguments.key) if arguments.key else None
    bar = None

    def advance(count, total):
        nonlocal bar
        if not arguments.json and sys.stderr.isatty():
            if bar is None:
                bar = tqdm(total=total, desc="restoring", unit="B", unit_scale=True, unit_divisor=1024,
                           file=sys.stderr, leave=False)
            bar.update(count)

    try:
        report = restore.restore(arguments.source, arguments.pool, until=until, pool_uuid=arguments.pool_uuid,
                                 progress=advance, key=key)
    finally:
        if bar is not None:
            bar.close()
    rate = report.bytes / report.seconds if report.seconds else 0.0
    result = {"pool": arguments.pool, "segments": report.segments, "records": report.records,
              "bytes": report.bytes, "seconds": round(report.seconds, 3),
              "bytes_per_second": round(rate, 1), "volumes": report.volumes,
              "as_of": history.format_point(report.last_stamp) if report.last_stamp else None,
              "origins": {str(origin): sequence for origin, sequence in sorted(report.origins.items())},
              # a key is refused for a store that is not encrypted: restored with one means encrypted
              "encrypted": key is not None, "key_fingerprint": key.fingerprint if key is not None else None}
    if arguments.json:
        print(json.dumps(result, indent=2))
        return
    print(f"restored {arguments.pool} from {arguments.source}: {report.segments} segments, {report.records} records, "
          f"{format_size(report.bytes)} in {report.seconds:.1f}s ({format_size(int(rate))}/s); volumes: "
          f"{', '.join(report.volumes) or 'none'}; as of {result['as_of'] or 'the start'}"
          + (f"; encrypted (key {key.fingerprint})" if key is not None else ""))
