"""Conflicts: the LMDB `conflicts` database. A block range that two nodes wrote concurrently
(neither had the other's write when it wrote its own); last writer wins, and this records it.

Key, big-endian (so LMDB's order is volume, then stamp, then block), 24 bytes:

| offset | size | type | field        | meaning                                      |
|-------:|-----:|------|--------------|----------------------------------------------|
|      0 |    4 | u32  | volume_id    |                                              |
|      4 |    8 | u64  | stamp        | the stamp of the write that arrived second   |
|     12 |    8 | u64  | first_block  |                                              |
|     20 |    4 | u32  | reserved     | 0                                            |

Value, little-endian, 24 bytes:

| offset | size | type | field      | meaning                                        |
|-------:|-----:|------|------------|------------------------------------------------|
|      0 |    8 | u64  | end_block  | the range is [first_block, end_block)          |
|      8 |    8 | u64  | other      | the stamp of the write it met (the node's index is its low 4 bits) |
|     16 |    8 | u64  | xxh3       | of key + bytes 0..15                           |

The winner is the greater stamp: it is what every node reads there.
"""

import struct

import xxhash

from chunkvol.errors import CorruptionError

KEY = struct.Struct(">IQQI")
VALUE = struct.Struct("<QQQ")


def encode(volume_id, first_block, end_block, other, stamp):
    raw_key = KEY.pack(volume_id, stamp, first_block, 0)
    body = struct.pack("<QQ", end_block, other)
    return raw_key, body + struct.pack("<Q", xxhash.xxh3_64_intdigest(raw_key + body))


def decode(raw_key, raw):
    """(volume_id, first block, end block, other stamp, stamp)."""
    raw_key, raw = bytes(raw_key), bytes(raw)
    if len(raw_key) != KEY.size or len(raw) != VALUE.size:
        raise CorruptionError("conflict entry has a bad length; `chunkvol check --repair` rebuilds the map")
    end_block, other, check = VALUE.unpack(raw)
    if xxhash.xxh3_64_intdigest(raw_key + raw[:16]) != check:
        raise CorruptionError("conflict entry fails its checksum; `chunkvol check --repair` rebuilds the map")
    volume_id, stamp, first_block, _ = KEY.unpack(raw_key)
    return volume_id, first_block, end_block, other, stamp
