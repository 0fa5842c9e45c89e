"""Flush-point history: the LMDB `history` database, one entry per (volume, flush point).

Every flush point at which a volume had changes gets an entry: `chunkvol history` lists them,
and "the volume as of time T" is the newest entry at or before T. Like the block map, it is a
cache of the log (COMMIT records and the writes before them) and is rebuilt with it.

Key, big-endian so that LMDB's order is (volume, time) (12 bytes):

| offset | size | type | field     | meaning                                   |
|-------:|-----:|------|-----------|-------------------------------------------|
|      0 |    4 | u32  | volume_id |                                           |
|      4 |    8 | u64  | stamp     | HLC stamp of the flush point (COMMIT)     |

Value, little-endian (16 bytes):

| offset | size | type | field         | meaning                                          |
|-------:|-----:|------|---------------|--------------------------------------------------|
|      0 |    8 | u64  | bytes_written | bytes written, zeroed or trimmed since the volume's previous flush point |
|      8 |    4 | u32  | node          | node that wrote the COMMIT                       |
|     12 |    4 | u32  | checksum      | low 32 bits of xxh3-64 of key + value bytes 0..11 |
"""

import struct

import xxhash

from chunkvol.errors import CorruptionError

KEY = struct.Struct(">IQ")
VALUE = struct.Struct("<QII")
assert KEY.size == 12 and VALUE.size == 16


def key(volume_id, stamp):
    return KEY.pack(volume_id, stamp)


def volume_prefix(volume_id):
    return KEY.pack(volume_id, 0)[:4]


def encode(raw_key, bytes_written, node):
    body = VALUE.pack(bytes_written, node, 0)[:12]
    return body + struct.pack("<I", xxhash.xxh3_64_intdigest(raw_key + body) & 0xFFFFFFFF)


def decode(raw_key, raw):
    """(volume_id, stamp, bytes_written, node) of one entry."""
    if len(raw_key) != KEY.size or len(raw) != VALUE.size:
        raise CorruptionError("history entry has a bad length; `chunkvol check --repair` rebuilds the index")
    bytes_written, node, checksum = VALUE.unpack(raw)
    if xxhash.xxh3_64_intdigest(bytes(raw_key) + bytes(raw[:12])) & 0xFFFFFFFF != checksum:
        raise CorruptionError("history entry fails its checksum; `chunkvol check --repair` rebuilds the index")
    volume_id, stamp = KEY.unpack(raw_key)
    return volume_id, stamp, bytes_written, node
