"""Received origins: the `origins` value in the LMDB `meta` database.

For every other node whose records this pool's log holds (a mirror receives them), the
greatest origin sequence among them. A shipper resumes after it, so nothing is applied twice.
Written in the same LMDB transaction as the checkpoint, so it matches the checkpoint's log
address; records replayed after the checkpoint raise it again. The `origin_stamps` value (node
-> stamp of its last COMMIT here) and `removed_volumes` (volume id -> stamp of its
VOLUME_REMOVE) have the same layout.

Little-endian:

| offset      | size | type | field    | meaning                                 |
|------------:|-----:|------|----------|-----------------------------------------|
|           0 |    4 | 4s   | magic    | b"CVor"                                 |
|           4 |    4 | u32  | count    | number of entries (at most 65536)       |
|           8 | 16*n | ...  | entries  | per entry: u64 node, u64 sequence; nodes ascending |
|    8 + 16*n |    8 | u64  | xxh3     | xxh3-64 of every byte before it         |
"""

import struct

import xxhash

from chunkvol.errors import CorruptionError

MAGIC = b"CVor"
HEAD = struct.Struct("<4sI")
ENTRY = struct.Struct("<QQ")
CHECK = struct.Struct("<Q")
MAX_ENTRIES = 65536


def encode(origins):
    items = sorted(origins.items())
    body = HEAD.pack(MAGIC, len(items)) + b"".join(ENTRY.pack(node, sequence) for node, sequence in items)
    return body + CHECK.pack(xxhash.xxh3_64_intdigest(body))


def decode(raw, path=None):
    raw = bytes(raw)
    if len(raw) < HEAD.size + CHECK.size:
        raise CorruptionError("origins entry is cut short", path)
    magic, count = HEAD.unpack_from(raw)
    if magic != MAGIC or count > MAX_ENTRIES or len(raw) != HEAD.size + count * ENTRY.size + CHECK.size:
        raise CorruptionError("origins entry is malformed", path)
    if CHECK.unpack_from(raw, len(raw) - CHECK.size)[0] != xxhash.xxh3_64_intdigest(raw[:-CHECK.size]):
        raise CorruptionError("origins entry checksum mismatch", path)
    return dict(ENTRY.iter_unpack(raw[HEAD.size:len(raw) - CHECK.size]))
