"""Block-map checkpoint: the `checkpoint` value in the LMDB `meta` database.

It says up to which log address the block map in the same LMDB transaction reflects the log;
opening a pool replays only the records after it. Written only after the log up to
`log_address` is durable (fdatasync), in the same synced LMDB transaction as the map.

Little-endian, 80 bytes:

| offset | size | type | field                 | meaning                                      |
|-------:|-----:|------|-----------------------|----------------------------------------------|
|      0 |    4 | 4s   | magic                 | b"CVck"                                      |
|      4 |    4 | u32  | version               | 1                                            |
|      8 |   16 | 16s  | pool_uuid             | guards against an index copied from another pool |
|     24 |    8 | u64  | log_address           | chunk_id << 40 | offset of the next record   |
|     32 |    8 | u64  | next_origin_sequence  | this node's next record sequence number      |
|     40 |    8 | u64  | max_hlc               | greatest clock value in the log so far       |
|     48 |    8 | u64  | next_volume_id        | volume ids are never reused                  |
|     56 |    8 | u64  | records_replayed      | records applied since the map was empty      |
|     64 |    8 | u64  | reserved              | 0                                            |
|     72 |    8 | u64  | xxh3                  | xxh3-64 of bytes 0..71                       |
"""

import struct
from typing import NamedTuple

import xxhash

from chunkvol.errors import CorruptionError, FormatError

MAGIC = b"CVck"
VERSION = 1
BODY = struct.Struct("<4sI16sQQQQQQ")
CHECK = struct.Struct("<Q")
assert BODY.size == 72 and BODY.size + CHECK.size == 80


class Checkpoint(NamedTuple):
    pool_uuid: bytes
    log_address: int
    next_origin_sequence: int
    max_hlc: int
    next_volume_id: int
    records_replayed: int


def encode(checkpoint):
    body = BODY.pack(MAGIC, VERSION, *checkpoint, 0)
    return body + CHECK.pack(xxhash.xxh3_64_intdigest(body))


def decode(raw, path=None):
    if len(raw) != BODY.size + CHECK.size:
        raise CorruptionError("checkpoint has a bad length", path)
    magic, version, *values, _ = BODY.unpack_from(raw)  # the last field is reserved
    if magic != MAGIC:
        raise FormatError("not a chunkvol checkpoint", path)
    if CHECK.unpack_from(raw, BODY.size)[0] != xxhash.xxh3_64_intdigest(raw[:BODY.size]):
        raise CorruptionError("checkpoint checksum mismatch", path)
    if version != VERSION:
        raise FormatError(f"unknown checkpoint version {version}", path)
    return Checkpoint(*values)
