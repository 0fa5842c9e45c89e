"""Chunk header: the first 4096 bytes of every chunk file.

A chunk is one large fixed-capacity container of log space. Its file grows by appending
records after the header and never past `capacity_bytes`.

Header, little-endian (bytes 64..4095 are zero):

| offset | size | type | field          | meaning                                   |
|-------:|-----:|------|----------------|-------------------------------------------|
|      0 |    8 | 8s   | magic          | b"CVCHUNK\\0"                              |
|      8 |    4 | u32  | version        | 1                                         |
|     12 |    4 | u32  | data_offset    | 4096: where the first record starts       |
|     16 |   16 | 16s  | pool_uuid      | the pool this chunk belongs to            |
|     32 |    8 | u64  | chunk_id       | position in allocation order, from 1      |
|     40 |    8 | u64  | capacity_bytes | the file never grows past this            |
|     48 |    8 | u64  | created_hlc    | hybrid logical clock at creation          |
|     56 |    8 | u64  | header_xxh3    | xxh3-64 of bytes 0..55                    |

A log address is one u64: chunk_id << 40 | byte offset in the chunk (chunks < 1 TiB).
"""

import struct

import xxhash

from chunkvol.errors import CorruptionError, FormatError

MAGIC = b"CVCHUNK\0"
VERSION = 1
DATA_OFFSET = 4096
HEADER = struct.Struct("<8sII16sQQQ")
CHECK = struct.Struct("<Q")
assert HEADER.size == 56 and HEADER.size + CHECK.size == 64

ADDRESS_SHIFT = 40
OFFSET_MASK = (1 << ADDRESS_SHIFT) - 1
MAX_CAPACITY = 1 << ADDRESS_SHIFT
MIN_CAPACITY = 16 << 20


def address(chunk_id, offset):
    return (chunk_id << ADDRESS_SHIFT) | offset


def split_address(log_address):
    return log_address >> ADDRESS_SHIFT, log_address & OFFSET_MASK


def encode(pool_uuid, chunk_id, capacity_bytes, created_hlc):
    body = HEADER.pack(MAGIC, VERSION, DATA_OFFSET, pool_uuid, chunk_id, capacity_bytes,
                       created_hlc)
    out = bytearray(DATA_OFFSET)
    out[:HEADER.size] = body
    CHECK.pack_into(out, HEADER.size, xxhash.xxh3_64_intdigest(body))
    return bytes(out)


def decode(data, path=None):
    """Return (pool_uuid, chunk_id, capacity_bytes, created_hlc); raise on anything foreign."""
    if len(data) < HEADER.size + CHECK.size:
        raise FormatError("chunk file shorter than its header", path, 0)
    magic, version, data_offset, pool_uuid, chunk_id, capacity, created = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FormatError("not a chunkvol chunk file (bad magic)", path, 0)
    (check,) = CHECK.unpack_from(data, HEADER.size)
    if xxhash.xxh3_64_intdigest(bytes(data[:HEADER.size])) != check:
        raise CorruptionError("chunk header checksum mismatch", path, 0)
    if version != VERSION:
        raise FormatError(f"unknown chunk format version {version}", path, 8)
    if data_offset != DATA_OFFSET or not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
        raise FormatError("chunk header has impossible sizes", path, 12)
    return pool_uuid, chunk_id, capacity, created
