"""`chunkvol inspect`: a human view of the bytes of every on-disk structure.

  inspect pool                         pool.json, decoded and checked
  inspect chunk ID [--from OFF] [-n N] the chunk header and its records, one per line
  inspect record CHUNK:OFFSET          one record's header fields and payload summary
  inspect checkpoint                   the block map's checkpoint
  inspect map VOLUME OFFSET [--all]    the map group holding a byte offset; --all: every version
"""

import json
import os

from chunkvol.clock import hlc_to_seconds
from chunkvol.errors import CorruptionError, UsageError
from chunkvol.format import chunk_header, group_map, pool_metadata, record
from chunkvol.format.record import GROUP_SIZE, HEADER_SIZE, RecordType
from chunkvol.log.reader import ChunkScan
from chunkvol.pool import Pool
from chunkvol.storage.chunks import chunk_name
from chunkvol.cli.common import open_pool_for_reading
from chunkvol.cli.sizes import parse_size
from datetime import datetime, timezone


def register(commands):
    inspect = commands.add_parser("inspect", help="show on-disk structures")
    what = inspect.add_subparsers(dest="what", metavar="WHAT")
    what.required = True
    what.add_parser("pool").set_defaults(run=inspect_pool)
    chunk = what.add_parser("chunk")
    chunk.add_argument("chunk_id", type=int)
    chunk.add_argument("--from", dest="start", type=int, default=chunk_header.DATA_OFFSET)
    chunk.add_argument("-n", "--count", type=int, default=50)
    chunk.set_defaults(run=inspect_chunk)
    one = what.add_parser("record")
    one.add_argument("where", help="CHUNK:OFFSET")
    one.set_defaults(run=inspect_record)
    what.add_parser("checkpoint").set_defaults(run=inspect_checkpoint)
    group = what.add_parser("map")
    group.add_argument("volume")
    group.add_argument("offset")
    group.add_argument("--all", action="store_true", help="every version, newest first")
    group.set_defaults(run=inspect_map)
    for parser in (chunk, one, group):
        parser.add_argument("--json", action="store_true")


def _when(hlc):
    return datetime.fromtimestamp(hlc_to_seconds(hlc), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _header_dict(header):
    return {"type": RecordType(header.record_type).name, "flags": header.flags, "volume_id": header.volume_id,
            "stored_length": header.stored_length, "origin_node": header.origin_node,
            "origin_sequence": header.origin_sequence, "hlc": header.hlc, "time": _when(header.hlc),
            "offset_bytes": header.offset_bytes, "length_bytes": header.length_bytes,
            "payload_xxh3": f"{header.payload_xxh3:016x}"}


def inspect_pool(arguments):
    path = os.path.join(os.path.abspath(arguments.pool), "pool.json")
    with open(path, "rb") as handle:
        fields = pool_metadata.decode(handle.read(), path)
    print(json.dumps(fields, indent=2))


def _chunk_file(arguments, chunk_id):
    pool_path = os.path.abspath(arguments.pool)
    fields = Pool.read_metadata(pool_path)
    for directory in fields["chunk_dirs"]:
        candidate = os.path.join(pool_path, directory, chunk_name(chunk_id))
        if os.path.exists(candidate):
            return candidate, fields
    raise UsageError(f"no chunk {chunk_id} in this pool")


def inspect_chunk(arguments):
    path, fields = _chunk_file(arguments, arguments.chunk_id)
    with open(path, "rb") as handle:
        head = handle.read(chunk_header.DATA_OFFSET)
        size = os.fstat(handle.fileno()).st_size
    pool_uuid, chunk_id, capacity, created = chunk_header.decode(head, path)
    print(f"chunk {chunk_id}: {path}\n  pool {pool_uuid.hex()}, capacity {capacity}, written {size}, "
          f"created {_when(created)}")
    with Pool.open(arguments.pool, readonly=True) as pool:
        scan = ChunkScan(pool.chunks, chunk_id, arguments.start)
        shown = 0
        print(f"  {'OFFSET':>12} {'TYPE':<13} {'VOL':>4} {'LOGICAL OFFSET':>15} {'LENGTH':>8} {'STORED':>7} "
              f"{'ORIGIN':>16} TIME")
        for offset, header, _ in scan:
            print(f"  {offset:>12} {RecordType(header.record_type).name:<13} {header.volume_id:>4} "
                  f"{header.offset_bytes:>15} {header.length_bytes:>8} {header.stored_length:>7} "
                  f"{header.origin_node:>10}/{header.origin_sequence:<5} {_when(header.hlc)}")
            shown += 1
            if shown >= arguments.count:
                print(f"  ... (--from {offset + HEADER_SIZE + header.stored_length} for more)")
                return
        if scan.stop_error is not None:
            print(f"  STOP at {scan.stop_offset}: {scan.stop_error}")
        else:
            print(f"  end at {scan.stop_offset}" + (" (sealed)" if scan.sealed else ""))


def inspect_record(arguments):
    try:
        chunk_text, offset_text = arguments.where.split(":")
        chunk_id, offset = int(chunk_text), int(offset_text)
    except ValueError:
        raise UsageError("give the record as CHUNK:OFFSET, e.g. 1:4096") from None
    path, _ = _chunk_file(arguments, chunk_id)
    with open(path, "rb") as handle:
        raw = os.pread(handle.fileno(), HEADER_SIZE, offset)
        header = record.decode_header(raw, path, offset)
        payload = os.pread(handle.fileno(), header.stored_length, offset + HEADER_SIZE)
    fields = _header_dict(header)
    try:
        record.verify_payload(header, payload, path, offset)
        fields["payload_check"] = "ok"
    except CorruptionError as error:
        fields["payload_check"] = str(error)
    if header.record_type in (RecordType.VOLUME_CREATE, RecordType.VOLUME_RESIZE, RecordType.VOLUME_REMOVE):
        fields["payload"] = payload.decode(errors="replace")
    elif header.record_type == RecordType.COMMIT and len(payload) == 8:
        durable = record.COMMIT_PAYLOAD.unpack_from(payload)[0]
        fields["durable_up_to"] = "%d:%d" % chunk_header.split_address(durable)
    print(json.dumps(fields, indent=2))


def inspect_checkpoint(arguments):
    with Pool.open(arguments.pool, readonly=True) as pool:
        checkpoint = pool.blockmap.read_checkpoint()
    if checkpoint is None:
        print("no checkpoint: the block map will be rebuilt from the log")
        return
    fields = checkpoint._asdict()
    fields["pool_uuid"] = fields["pool_uuid"].hex()
    fields["log_address"] = "%d:%d" % chunk_header.split_address(fields["log_address"])
    print(json.dumps(fields, indent=2))


def inspect_map(arguments):
    offset = parse_size(arguments.offset)
    with open_pool_for_reading(arguments.pool) as pool:
        info = pool.volume_info(arguments.volume)
        group = offset // GROUP_SIZE
        versions = []
        txn = pool.blockmap.reader()
        live = pool.blockmap.get(txn, info.volume_id, group)
        cursor = txn.cursor()
        prefix = group_map.newest_key(info.volume_id, group)[:12]
        if arguments.all and cursor.set_range(prefix + bytes(12)):
            for raw_key, raw_value in cursor:
                if raw_key[:12] != prefix:
                    break
                _, _, hlc, node = group_map.decode_key(raw_key)
                versions.append({"hlc": hlc, "time": _when(hlc), "node": node,
                                 "state": _state_dict(group_map.decode_state(raw_value, raw_key))})
    out = {"volume": info.name, "group": group, "bytes": [group * GROUP_SIZE, (group + 1) * GROUP_SIZE],
           "live": _state_dict(live)}
    if arguments.all:
        out["versions"] = versions
    print(json.dumps(out, indent=2))


def _state_dict(state):
    if state is None:
        return None
    slots, refs = state
    return {"slots": [None if s == group_map.HOLE else {"record": s >> 4, "block": s & 15} for s in slots],
            "records": [{"at": "%d:%d" % chunk_header.split_address(address), "stored_length": stored_length,
                         "hlc": hlc, "flags": flags} for address, stored_length, hlc, flags in refs]}
