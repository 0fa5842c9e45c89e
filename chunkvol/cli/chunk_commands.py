"""`chunkvol chunk list|evict|policy`: which chunks are on this disk, and tiering to an object
store (chunkvol/tiering.py)."""

import json
import os

from chunkvol import tiering
from chunkvol.cli.common import run_operation
from chunkvol.cli.progress import progress_bar
from chunkvol.cli.sizes import format_size, parse_size
from chunkvol.errors import UsageError
from chunkvol.mirror.source import LogSource
from chunkvol.pool import Pool
from chunkvol.storage.files import LocalFiles


def register(commands):
    chunk = commands.add_parser("chunk", help="the pool's chunks; evict old ones to an object store")
    actions = chunk.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="every chunk: on this disk or evicted, size, cached bytes")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=chunk_list)
    evict = actions.add_parser("evict", help="move chunks whose records are in an object store off this disk")
    evict.add_argument("ids", nargs="*", type=int, metavar="ID")
    evict.add_argument("--keep-under", metavar="SIZE", help="evict the oldest eligible chunks until local "
                                                           "chunk bytes are under SIZE")
    evict.add_argument("--mirror", help="the object-store mirror to evict to (default: the only one)")
    evict.add_argument("--json", action="store_true")
    evict.set_defaults(run=chunk_evict)
    policy = actions.add_parser("policy", help="keep local chunk bytes under a size: `serve` evicts as it ships")
    policy.add_argument("--keep-under", metavar="SIZE", help="the bound (omit to show the policy)")
    policy.add_argument("--mirror", help="the object-store mirror to evict to (default: the only one)")
    policy.add_argument("--off", action="store_true", help="remove the policy")
    policy.set_defaults(run=chunk_policy)


def chunk_list(arguments):
    source = LogSource(arguments.pool, Pool.read_metadata(arguments.pool), LocalFiles())
    try:
        rows = []
        for chunk_id in source.chunks.ids():
            chunk = source.chunks.get(chunk_id)
            row = {"id": chunk_id, "size": chunk.size_bytes, "capacity": chunk.capacity_bytes,
                   "where": "local" if chunk.remote is None else "evicted", "path": chunk.path,
                   "store": None, "cached_bytes": 0}
            if chunk.remote is not None:
                row["store"] = chunk.remote.manifest.store_url
                try:
                    row["cached_bytes"] = os.stat(chunk.remote.cache_path).st_blocks * 512
                except FileNotFoundError:
                    pass
            rows.append(row)
    finally:
        source.close()
    if arguments.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        where = "local" if row["where"] == "local" else f"evicted to {row['store']} (cached {format_size(row['cached_bytes'])})"
        print(f"chunk {row['id']}  {format_size(row['size'])} of {format_size(row['capacity'])}  {where}")
    local = sum(row["size"] for row in rows if row["where"] == "local")
    remote = sum(row["size"] for row in rows if row["where"] != "local")
    print(f"local {format_size(local)}, evicted {format_size(remote)}")


def chunk_evict(arguments):
    path = arguments.pool
    fields = Pool.read_metadata(path)
    if bool(arguments.ids) == bool(arguments.keep_under):
        raise UsageError("name the chunks to evict, or give --keep-under SIZE (not both)")
    store_url = tiering.choose_store(path, arguments.mirror)

    def switch(chunk_id):
        return run_operation(path, "chunk_switch", chunk_id=chunk_id)

    if arguments.keep_under:
        results = tiering.evict_under(path, fields, parse_size(arguments.keep_under), arguments.mirror, switch)
    else:
        source = LogSource(path, fields, LocalFiles())
        try:
            total = sum(source.chunks.get(chunk_id).size_bytes for chunk_id in arguments.ids
                        if source.chunks.get(chunk_id).remote is None)
        finally:
            source.close()
        with progress_bar(total, "uploading", enabled=not arguments.json) as advance:
            results = tiering.evict(path, fields, arguments.ids, store_url, switch, progress=advance)
    if arguments.json:
        print(json.dumps(results, indent=2))
        return
    if not results:
        print("nothing to evict")
    for result in results:
        print(f"chunk {result['chunk']} evicted to {result['store']}: {format_size(result['freed_bytes'])} freed here")


def chunk_policy(arguments):
    path = arguments.pool
    Pool.read_metadata(path)
    if arguments.off:
        tiering.save_policy(path, None)
        print("no tiering policy: chunks stay on this disk unless `chunk evict` moves them")
        return
    if arguments.keep_under:
        tiering.choose_store(path, arguments.mirror)  # a mistake shows now, not in the shipper's log
        tiering.save_policy(path, {"keep_under": parse_size(arguments.keep_under), "mirror": arguments.mirror})
    policy = tiering.load_policy(path)
    if policy is None:
        print("no tiering policy")
        return
    print(f"keep local chunk bytes under {format_size(policy['keep_under'])}, evicting to "
          f"{policy['mirror'] or 'the object-store mirror'}; a running `serve` applies it after each shipping pass")
