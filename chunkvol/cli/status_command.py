"""`chunkvol status`: chunks, volumes, space and the log position."""

import json
import time

from chunkvol import history
from chunkvol.cli.common import open_pool_for_reading
from chunkvol.cli.sizes import format_size
from chunkvol.format import chunk_header
from chunkvol.space import pool_space


def register(commands):
    status = commands.add_parser("status", help="chunks, volumes, space, log position")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=status_command)


def collect(pool):
    space = pool_space(pool)
    held, referenced = history.history_space(pool)
    for name, volume in space["volumes"].items():
        volume.update(held[name])
        volume["snapshot_unique_bytes"] = {row["name"]: row["unique_bytes"]
                                           for row in history.snapshot_rows(pool, name)}
    chunk_id, offset = chunk_header.split_address(pool.writer.position)
    chunks = []
    for each in pool.chunks.ids():
        chunk = pool.chunks.get(each)
        chunks.append({"id": each, "path": chunk.path, "capacity": chunk.capacity_bytes,
                       "written": chunk.size_bytes,
                       "fill": round(chunk.size_bytes / chunk.capacity_bytes, 4),
                       "live_bytes": space["live_bytes_by_chunk"].get(each, 0),
                       "evicted_to": chunk.remote.manifest.store_url if chunk.remote is not None else None})
    written = sum(c["written"] for c in chunks)
    live = sum(c["live_bytes"] for c in chunks)
    stats = pool.blockmap.stats()
    return {
        "pool": pool.path,
        "pool_uuid": pool.pool_uuid.hex(),
        "node_id": pool.node_id,
        "chunk_size": pool.chunk_size,
        "cache": pool.cache,
        "role": pool.role,
        "mirror_of": pool.fields.get("mirror_of"),
        "log": {"chunk": chunk_id, "offset": offset, "written_bytes": written, "live_bytes": live,
                "history_bytes": max(0, referenced - live), "referenced_bytes": referenced,
                "reclaimable_bytes": max(0, written - referenced), "next_sequence": pool.next_sequence,
                "records_replayed_at_open": pool.replayed_at_open},
        "chunks": chunks,
        "volumes": space["volumes"],
        "index": stats,
        "damage": [str(error) for error in pool.damage],
        "notes": list(pool.notes),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def status_command(arguments):
    with open_pool_for_reading(arguments.pool) as pool:
        report = collect(pool)
    if arguments.json:
        print(json.dumps(report, indent=2))
        return
    log = report["log"]
    print(f"pool {report['pool']}  node {report['node_id']}  chunks of {format_size(report['chunk_size'])}  "
          f"cache {report['cache']}" + (f"  mirror of node {report['mirror_of']}" if report["role"] == "mirror" else ""))
    print(f"log: at chunk {log['chunk']} offset {log['offset']}; written {format_size(log['written_bytes'])}: "
          f"live {format_size(log['live_bytes'])}, history {format_size(log['history_bytes'])}, "
          f"reclaimable {format_size(log['reclaimable_bytes'])} (`chunkvol compact`)")
    print(f"\n{'CHUNK':>6} {'WRITTEN':>11} {'FILL':>6} {'LIVE':>11}  PATH")
    for chunk in report["chunks"]:
        print(f"{chunk['id']:>6} {format_size(chunk['written']):>11} {chunk['fill']:>6.1%} "
              f"{format_size(chunk['live_bytes']):>11}  {chunk['path']}")
    print(f"\n{'VOLUME':<20} {'SIZE':>11} {'MAPPED':>11} {'STORED':>11} {'RATIO':>6} {'HISTORY':>11} {'SNAPS':>5} "
          "COMPRESSION")
    for name, volume in report["volumes"].items():
        print(f"{name:<20} {format_size(volume['size']):>11} {format_size(volume['mapped_bytes']):>11} "
              f"{format_size(volume['stored_bytes']):>11} {volume['compression_ratio']:>6.2f} "
              f"{format_size(volume['history_bytes']):>11} {volume['snapshots']:>5} {volume['compression']}")
        for snapshot, unique in volume["snapshot_unique_bytes"].items():
            print(f"  @{snapshot:<17} holds {format_size(unique)} no other point uses")
    for note in report["notes"]:
        print(f"note: {note}")
    if report["damage"]:
        print("\ndamage found while opening (run `chunkvol check`):")
        for line in report["damage"]:
            print(f"  {line}")
