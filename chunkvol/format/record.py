"""Log record: the self-describing, checksummed unit of the log.

A record is a 72-byte header followed by `stored_length` payload bytes. Records follow each
other with no padding inside a chunk, starting at the chunk's data offset (4096).

Header, little-endian:

| offset | size | type | field           | meaning                                                  |
|-------:|-----:|------|-----------------|----------------------------------------------------------|
|      0 |    4 | 4s   | magic           | b"CVrc"                                                  |
|      4 |    1 | u8   | version         | 1                                                        |
|      5 |    1 | u8   | record_type     | see RecordType                                           |
|      6 |    2 | u16  | flags           | bit 0: payload is one zstd frame; bit 1: ZERO is a trim  |
|      8 |    4 | u32  | volume_id       | 0 for pool-wide records (COMMIT, SEAL)                   |
|     12 |    4 | u32  | stored_length   | payload bytes on disk                                    |
|     16 |    8 | u64  | origin_node     | node id that wrote the record first                      |
|     24 |    8 | u64  | origin_sequence | per-origin-node sequence number, from 1                  |
|     32 |    8 | u64  | hlc             | hybrid logical clock: wall ms << 16 | counter            |
|     40 |    8 | u64  | offset_bytes    | logical byte offset in the volume                        |
|     48 |    8 | u64  | length_bytes    | logical bytes covered (uncompressed payload length)      |
|     56 |    8 | u64  | payload_xxh3    | xxh3-64 of the stored payload bytes                      |
|     64 |    8 | u64  | header_xxh3     | xxh3-64 of header bytes 0..63                            |

Payloads by type:
- EXTENT: the data of blocks [offset, offset+length), block-aligned, inside one 64 KiB map
  group; raw, or one zstd frame whose declared content size must equal length_bytes.
- ZERO: none; the range reads as zeros (a trim too, flag bit 1; both become holes).
- COMMIT: 8 bytes, u64 log address up to which every byte was made durable before this record
  was written. A flush point of the whole pool.
- SEAL: none; the last record of a chunk that was synced before the next chunk got a record.
- VOLUME_CREATE / VOLUME_RESIZE / VOLUME_REMOVE: UTF-8 JSON describing the volume.

A record is valid when (1) the magic matches, (2) the version is known, (3) header_xxh3
matches, (4) the type is known, (5) it fits inside the chunk's written bytes, and (6)
payload_xxh3 matches. The reader checks 1-5 to walk and 6 before anything is used.
"""

import enum
import struct

import xxhash

from chunkvol.errors import CorruptionError, FormatError

MAGIC = b"CVrc"
VERSION = 1
HEADER_BODY = struct.Struct("<4sBBHIIQQQQQQ")
HEADER_CHECK = struct.Struct("<Q")
HEADER_SIZE = HEADER_BODY.size + HEADER_CHECK.size
assert HEADER_BODY.size == 64 and HEADER_SIZE == 72

FLAG_ZSTD = 1
FLAG_TRIM = 2

BLOCK_SIZE = 4096
GROUP_BLOCKS = 16  # one map group: 64 KiB; an EXTENT record never crosses a group
GROUP_SIZE = BLOCK_SIZE * GROUP_BLOCKS
MAX_PAYLOAD = GROUP_SIZE + 65536  # a zstd frame of incompressible data is a little larger
COMMIT_PAYLOAD = struct.Struct("<Q")

_xxh3 = xxhash.xxh3_64_intdigest


class RecordType(enum.IntEnum):
    EXTENT = 1
    ZERO = 2
    COMMIT = 3
    SEAL = 4
    VOLUME_CREATE = 5
    VOLUME_RESIZE = 6
    VOLUME_REMOVE = 7


_KNOWN_TYPES = frozenset(int(t) for t in RecordType)


class RecordHeader(tuple):
    """Decoded header fields, in header order (a plain tuple: cheap on the read path)."""

    __slots__ = ()
    record_type = property(lambda self: self[0])
    flags = property(lambda self: self[1])
    volume_id = property(lambda self: self[2])
    stored_length = property(lambda self: self[3])
    origin_node = property(lambda self: self[4])
    origin_sequence = property(lambda self: self[5])
    hlc = property(lambda self: self[6])
    offset_bytes = property(lambda self: self[7])
    length_bytes = property(lambda self: self[8])
    payload_xxh3 = property(lambda self: self[9])


def encode_header_into(buffer, position, record_type, flags, volume_id, payload,
                       origin_node, origin_sequence, hlc, offset_bytes, length_bytes):
    """Write the header for `payload` at buffer[position:position+72]; returns its size."""
    HEADER_BODY.pack_into(buffer, position, MAGIC, VERSION, record_type, flags, volume_id,
                          len(payload), origin_node, origin_sequence, hlc, offset_bytes,
                          length_bytes, _xxh3(payload))
    with memoryview(buffer) as view:
        check = _xxh3(view[position:position + HEADER_BODY.size])
    HEADER_CHECK.pack_into(buffer, position + HEADER_BODY.size, check)
    return HEADER_SIZE


def encode(record_type, flags, volume_id, payload, origin_node, origin_sequence, hlc,
           offset_bytes, length_bytes):
    """A whole record as bytes (header + payload); for tests and rare records."""
    out = bytearray(HEADER_SIZE + len(payload))
    encode_header_into(out, 0, record_type, flags, volume_id, payload, origin_node,
                       origin_sequence, hlc, offset_bytes, length_bytes)
    out[HEADER_SIZE:] = payload
    return bytes(out)


_BLANK_HEADER = bytes(HEADER_SIZE)


def is_blank(view):
    """True when a header-sized region is all zero bytes: never-written space."""
    return bytes(view[:HEADER_SIZE]) == _BLANK_HEADER


def decode_header(view, path=None, offset=None):
    """Check rules 1-4 on a 72-byte header and return its fields; raise CorruptionError."""
    if len(view) < HEADER_SIZE:
        raise CorruptionError("truncated record header", path, offset)
    fields = HEADER_BODY.unpack_from(view, 0)
    if fields[0] != MAGIC:
        raise CorruptionError("bad record magic", path, offset)
    (check,) = HEADER_CHECK.unpack_from(view, HEADER_BODY.size)
    with memoryview(view) as body:
        if _xxh3(body[:HEADER_BODY.size]) != check:
            raise CorruptionError("record header checksum mismatch", path, offset)
    if fields[1] != VERSION:
        raise FormatError(f"unknown record version {fields[1]}", path, offset)
    if fields[2] not in _KNOWN_TYPES:
        raise FormatError(f"unknown record type {fields[2]}", path, offset)
    if fields[5] > MAX_PAYLOAD and fields[2] == RecordType.EXTENT:
        raise CorruptionError(f"record payload length {fields[5]} over the limit", path, offset)
    return RecordHeader(fields[2:12])


def verify_payload(header, payload, path=None, offset=None):
    """Rule 6: the payload's checksum matches its header."""
    if len(payload) != header[3] or _xxh3(payload) != header[9]:
        raise CorruptionError("record payload checksum mismatch", path, offset)
