"""Log segment: one shipped batch of a node's records as an immutable object in an object store.

Object name (so that a listing in name order is log order):
  chunkvol/POOL_UUID/log/ORIGIN/FIRST-LAST.seg
with ORIGIN, FIRST and LAST (the origin node and its first and last record sequence) as 16
lower-case hex digits.

Header, little-endian (120 bytes), then the payload:

| offset | size | type   | field             | meaning                                                |
|-------:|-----:|--------|-------------------|--------------------------------------------------------|
|      0 |    4 | 4s     | magic             | b"CVsg"                                                |
|      4 |    1 | u8     | version           | 1                                                      |
|      5 |    3 | -      | reserved          | 0                                                      |
|      8 |   16 | 16s    | pool_uuid         | the pool the records belong to                         |
|     24 |    8 | u64    | origin_node       | the node that wrote every record of the segment        |
|     32 |    8 | u64    | first_sequence    | origin sequence of the first record                    |
|     40 |    8 | u64    | last_sequence     | origin sequence of the last record (a COMMIT)          |
|     48 |    8 | u64    | previous_sequence | last_sequence of this origin's previous segment (0: none) |
|     56 |    8 | u64    | previous_digest   | header_xxh3 of that previous segment (0: none)         |
|     64 |    8 | u64    | first_stamp       | hlc of the first record                                |
|     72 |    8 | u64    | last_stamp        | hlc of the last record: the flush point it ends at     |
|     80 |    4 | u32    | record_count      |                                                        |
|     84 |    4 | u32    | reserved          | 0                                                      |
|     88 |    8 | u64    | payload_bytes     | bytes after the header                                 |
|     96 |    8 | u64    | payload_xxh3      | xxh3-64 of the payload                                 |
|    104 |    8 | u64    | reserved          | 0                                                      |
|    112 |    8 | u64    | header_xxh3       | xxh3-64 of bytes 0..111                                |

Payload: the records, each whole (72-byte record header and its payload, format/record.py),
one after another, exactly as in the origin's log.

The header binds the segment to its pool, origin and sequence range, and the previous_*
fields chain each origin's segments: a segment that was altered, swapped with another,
taken from another pool, left over from an older upload or missing from a chain is detected
before any of its records is used.
"""

import re
import struct

import xxhash

from chunkvol.errors import CorruptionError, FormatError
from chunkvol.format import record

MAGIC = b"CVsg"
VERSION = 1
HEADER = struct.Struct("<4sB3x16sQQQQQQQIIQQQ")
HEADER_CHECK = struct.Struct("<Q")
HEADER_SIZE = HEADER.size + HEADER_CHECK.size
assert HEADER_SIZE == 120
MAX_PAYLOAD_BYTES = 256 << 20  # a shipped batch is at most a few tens of MiB
NAME = re.compile(r"^chunkvol/([0-9a-f]{32})/log/([0-9a-f]{16})/([0-9a-f]{16})-([0-9a-f]{16})\.seg$")
_xxh3 = xxhash.xxh3_64_intdigest


class SegmentHeader:
    __slots__ = ("pool_uuid", "origin", "first_sequence", "last_sequence", "previous_sequence",
                 "previous_digest", "first_stamp", "last_stamp", "record_count", "payload_bytes",
                 "payload_xxh3", "digest")

    def __init__(self, fields, digest):
        (self.pool_uuid, self.origin, self.first_sequence, self.last_sequence, self.previous_sequence,
         self.previous_digest, self.first_stamp, self.last_stamp, self.record_count, self.payload_bytes,
         self.payload_xxh3) = fields
        self.digest = digest


def pool_prefix(pool_uuid):
    return f"chunkvol/{pool_uuid.hex()}/"


def origin_prefix(pool_uuid, origin):
    return f"{pool_prefix(pool_uuid)}log/{origin:016x}/"


def name(pool_uuid, origin, first_sequence, last_sequence):
    return f"{origin_prefix(pool_uuid, origin)}{first_sequence:016x}-{last_sequence:016x}.seg"


def parse_name(text):
    """(pool_uuid, origin, first, last) of a segment's object name, or None."""
    match = NAME.match(text)
    if match is None:
        return None
    return bytes.fromhex(match.group(1)), int(match.group(2), 16), int(match.group(3), 16), int(match.group(4), 16)


def encode(pool_uuid, origin, raw_records, previous_sequence, previous_digest):
    """(bytes, header) of a segment holding `raw_records` (each one whole record)."""
    first = record.decode_header(raw_records[0][:record.HEADER_SIZE])
    last = record.decode_header(raw_records[-1][:record.HEADER_SIZE])
    payload = b"".join(raw_records)
    payload_bytes, payload_xxh3 = len(payload), _xxh3(payload)
    fields = (pool_uuid, origin, first.origin_sequence, last.origin_sequence, previous_sequence, previous_digest,
              first.hlc, last.hlc, len(raw_records), payload_bytes, payload_xxh3)
    head = HEADER.pack(MAGIC, VERSION, pool_uuid, *fields[1:9], 0, payload_bytes, payload_xxh3, 0)
    digest = _xxh3(head)
    return head + HEADER_CHECK.pack(digest) + payload, SegmentHeader(fields, digest)


def decode_header(data, object_name):
    """Check and decode a segment's header against the name it was found under."""
    if len(data) < HEADER_SIZE:
        raise CorruptionError(f"segment header cut short ({len(data)} bytes)", object_name)
    head = bytes(data[:HEADER.size])
    (magic, version, pool_uuid, origin, first, last, previous_sequence, previous_digest, first_stamp,
     last_stamp, count, _, payload_bytes, payload_xxh3, _) = HEADER.unpack(head)
    if magic != MAGIC:
        raise FormatError("not a chunkvol log segment (bad magic)", object_name)
    if version != VERSION:
        raise FormatError(f"unknown segment version {version}", object_name)
    digest = HEADER_CHECK.unpack_from(data, HEADER.size)[0]
    if _xxh3(head) != digest:
        raise CorruptionError("segment header checksum mismatch", object_name)
    named = parse_name(object_name)
    if named is None or named != (pool_uuid, origin, first, last):
        raise CorruptionError("segment is not the one its name says (pool, origin or sequences differ): "
                              "swapped or copied from elsewhere", object_name)
    if not (0 < first <= last and previous_sequence < first and 0 < count
            and count <= payload_bytes // record.HEADER_SIZE and payload_bytes <= MAX_PAYLOAD_BYTES):
        raise CorruptionError("segment header fields are out of range", object_name)
    return SegmentHeader((pool_uuid, origin, first, last, previous_sequence, previous_digest, first_stamp,
                          last_stamp, count, payload_bytes, payload_xxh3), digest)


def split_records(data, header, object_name):
    """The whole records of a segment's bytes (header already decoded), checked for size,
    payload checksum and record framing; each record's own checks are the receiver's."""
    payload = memoryview(data)[HEADER_SIZE:]
    if len(payload) != header.payload_bytes:
        raise CorruptionError(f"segment payload is {len(payload)} bytes, its header says {header.payload_bytes}",
                              object_name)
    if _xxh3(payload) != header.payload_xxh3:
        raise CorruptionError("segment payload checksum mismatch", object_name)
    records = []
    position = 0
    while position < len(payload):
        try:
            fields = record.decode_header(payload[position:position + record.HEADER_SIZE])
        except CorruptionError as error:
            raise CorruptionError(f"record {len(records)} of the segment: {error}", object_name) from None
        end = position + record.HEADER_SIZE + fields.stored_length
        if end > len(payload):
            raise CorruptionError(f"record {len(records)} runs past the end of the segment", object_name)
        records.append(payload[position:end])
        position = end
    if len(records) != header.record_count:
        raise CorruptionError(f"segment holds {len(records)} records, its header says {header.record_count}",
                              object_name)
    return records
