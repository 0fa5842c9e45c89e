"""Reading a pool's files straight from disk in tests, to check what a server really wrote."""

import glob
import json
import os
import struct

from tests.support.server import chunkvol

HEADER = struct.Struct("<4sBBHIIQQQQQQ")  # the record header without its own checksum
HEADER_SIZE = 72
DATA_OFFSET = 4096


def chunk_files(pool):
    return sorted(glob.glob(os.path.join(pool, "chunks", "chunk-*.cvc")))


def log_records(pool):
    """Every record of the pool's chunk files in log order, as dicts of header fields."""
    records = []
    for path in chunk_files(pool):
        with open(path, "rb") as handle:
            data = handle.read()
        position = DATA_OFFSET
        while position + HEADER_SIZE <= len(data):
            fields = HEADER.unpack_from(data, position)
            if fields[0] != b"CVrc":
                break
            records.append({"path": path, "position": position, "type": fields[2], "flags": fields[3],
                            "volume": fields[4], "stored": fields[5], "node": fields[6], "sequence": fields[7],
                            "hlc": fields[8], "offset": fields[9], "length": fields[10]})
            position += HEADER_SIZE + fields[5]
    return records


def volume_id(pool, name):
    listing = json.loads(chunkvol("--pool", pool, "volume", "list", "--json").stdout)
    return next(row["id"] for row in listing if row["name"] == name)
