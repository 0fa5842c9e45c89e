"""Log record: the self-describing, checksummed unit of the log.

A record is a 72-byte header followed by `stored_length` payload bytes. Records follow each
other with no padding inside a chunk, starting at the chunk's data offset (4096).

Header, little-endian:

| offset | size | type | field           | meaning                                                  |
|-------:|-----:|------|-----------------|----------------------------------------------------------|
|      0 |    4 | 4s   | magic           | b"CVrc"                                                  |
|      4 |    1 | u8   | version         | 1                                                        |
|      5 |    1 | u8   | record_type     | see RecordType                                           |
|      6 |    2 | u16  | flags           | bit 0: zstd; bit 1: ZERO is a trim; bit 2: MORE; bit 3: RELOCATED |
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
  group. Raw (flags bit 0 clear): a table of one u64 xxh3-64 per 4 KiB block, then the blocks;
  payload_xxh3 covers the table, each table entry its block, so one block can be read and
  checked without the rest (stored_length = blocks * 4104). Compressed (bit 0 set): one zstd
  frame whose declared content size must equal length_bytes; payload_xxh3 covers the frame.
- ZERO: none; the range reads as zeros (a trim too, flag bit 1; both become holes).
- COMMIT: 8 bytes, u64 log address up to which every byte was made durable before this record
  was written. A flush point of the whole pool. In a pool that takes other nodes' records,
  n more entries of 16 bytes follow (u64 node, u64 stamp, nodes ascending, n <= 16): the
  stamp of each other node's last COMMIT applied here before this flush interval, so a node
  that receives it knows which of its writes the origin had seen (conflicts).
- SEAL: none; the last record of a chunk that was synced before the next chunk got a record.
- VOLUME_CREATE / VOLUME_RESIZE / VOLUME_REMOVE: UTF-8 JSON describing the volume
  ({"name", "size", "compression"}; a clone adds "parent": {"id", "stamp", "snapshot"}).
  In a pool of several writing nodes VOLUME_CREATE also says {"mode": "multi-master" |
  "single-primary", "primary": node id (single-primary)}.
- VOLUME_PRIMARY: UTF-8 JSON {"primary": node id}: from its stamp on, that node is the
  single-primary volume's writer (`volume promote`); the greatest stamp wins.
- SNAPSHOT: UTF-8 JSON {"op": "create"|"remove", "name", "stamp", "size", "created"}: a named
  flush point of the volume (stamp: the COMMIT just before it), or its removal.
- ROLLBACK: UTF-8 JSON {"stamp", "label"}: from here on the volume's content is what it was
  at that stamp (every group is set to its version as of the stamp).
- PRUNE: UTF-8 JSON {"before", "keep": [stamps], "retained_from"}: versions and history of the
  volume that no point after `before` or in `keep` needs are released.
- BASE / BASE_END: the block map as of a log address, written by compaction (format/base.py).
- An EXTENT with flag bit 3 (RELOCATED) is compaction's copy of an older record: same header
  fields and payload, new place. Replay skips it (the map is pointed at it by compaction, and
  a base records that), so it never counts as a new write.

One client request may need several records (a write longer than a map group, a zero with
unaligned edges). Every record of a request but its last carries flag bit 2 (MORE). Replay
applies a request's records only when its last record is there, so a crash never leaves half
a request: a run of MORE records that ends in anything else (a COMMIT, the torn tail) is
discarded. Only SEAL may stand between the records of a request.

A record is valid when (1) the magic matches, (2) the version is known, (3) header_xxh3
matches, (4) the type is known, (5) it fits inside the chunk's written bytes, and (6)
payload_xxh3 matches (and, for a raw EXTENT, every block matches its table entry). The
reader checks 1-5 to walk and 6 before anything is used.
"""

import enum
import os
import struct
from operator import itemgetter

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
FLAG_MORE = 4  # more records of the same client request follow
FLAG_RELOCATED = 8  # compaction's copy of an older EXTENT record

BLOCK_SIZE = 4096
GROUP_BLOCKS = 16  # one map group: 64 KiB; an EXTENT record never crosses a group
GROUP_SIZE = BLOCK_SIZE * GROUP_BLOCKS
MAX_PAYLOAD = GROUP_SIZE + 65536  # a zstd frame of incompressible data is a little larger
COMMIT_PAYLOAD = struct.Struct("<Q")
COMMIT_SEEN = struct.Struct("<QQ")
MAX_COMMIT_SEEN = 16
CHECKSUM_BYTES = 8
RAW_BLOCK_BYTES = BLOCK_SIZE + CHECKSUM_BYTES  # stored bytes per block of a raw EXTENT
BLOCK_TABLES = [struct.Struct(f"<{count}Q") for count in range(GROUP_BLOCKS + 1)]

_xxh3 = xxhash.xxh3_64_intdigest


class RecordType(enum.IntEnum):
    EXTENT = 1
    ZERO = 2
    COMMIT = 3
    SEAL = 4
    VOLUME_CREATE = 5
    VOLUME_RESIZE = 6
    VOLUME_REMOVE = 7
    SNAPSHOT = 8
    ROLLBACK = 9
    PRUNE = 10
    BASE = 11
    BASE_END = 12
    VOLUME_PRIMARY = 13


_KNOWN_TYPES = frozenset(int(t) for t in RecordType)
# What a node ships to its mirrors and peers: a change of a volume or a flush point, never a
# record about this log itself (SEAL, BASE, BASE_END).
SHIPPED_TYPES = frozenset((RecordType.EXTENT, RecordType.ZERO, RecordType.COMMIT, RecordType.VOLUME_CREATE,
                           RecordType.VOLUME_RESIZE, RecordType.VOLUME_REMOVE, RecordType.SNAPSHOT,
                           RecordType.ROLLBACK, RecordType.PRUNE, RecordType.VOLUME_PRIMARY))


class RecordHeader(tuple):
    """Decoded header fields, in header order (a plain tuple: cheap on the read path).
    Off the per-request path read them by name (header.offset_bytes); on it, index or unpack."""

    __slots__ = ()
    record_type = property(itemgetter(0))
    flags = property(itemgetter(1))
    volume_id = property(itemgetter(2))
    stored_length = property(itemgetter(3))
    origin_node = property(itemgetter(4))
    origin_sequence = property(itemgetter(5))
    hlc = property(itemgetter(6))
    offset_bytes = property(itemgetter(7))
    length_bytes = property(itemgetter(8))
    payload_xxh3 = property(itemgetter(9))


def encode_header_into(buffer, position, record_type, flags, volume_id, payload,
                       origin_node, origin_sequence, hlc, offset_bytes, length_bytes, table=None):
    """Write the header at buffer[position:position+72]; returns its size. For a raw EXTENT
    pass the block checksum `table`: the record's payload is then table + payload."""
    if table is None:
        stored_length, payload_checksum = len(payload), _xxh3(payload)
    else:
        stored_length, payload_checksum = len(table) + len(payload), _xxh3(table)
    HEADER_BODY.pack_into(buffer, position, MAGIC, VERSION, record_type, flags, volume_id,
                          stored_length, origin_node, origin_sequence, hlc, offset_bytes,
                          length_bytes, payload_checksum)
    with memoryview(buffer) as view:
        check = _xxh3(view[position:position + HEADER_BODY.size])
    HEADER_CHECK.pack_into(buffer, position + HEADER_BODY.size, check)
    return HEADER_SIZE


def encode_record_into(buffer, position, record_type, flags, volume_id, payload,
                       origin_node, origin_sequence, hlc, offset_bytes, length_bytes, table):
    """Write a whole record at buffer[position:]: the header, then `table` (a raw EXTENT's
    block checksums; empty for any other record) and `payload`; returns the record's size."""
    size = HEADER_SIZE + len(table) + len(payload)
    encode_header_into(buffer, position, record_type, flags, volume_id, payload, origin_node, origin_sequence,
                       hlc, offset_bytes, length_bytes, table=table or None)
    if table:
        data_at = position + HEADER_SIZE + len(table)
        buffer[position + HEADER_SIZE:data_at] = table
        buffer[data_at:position + size] = payload
    else:
        buffer[position + HEADER_SIZE:position + size] = payload
    return size


def block_table(data):
    """The checksum table of block-aligned `data` (a raw EXTENT's payload prefix)."""
    view = memoryview(data)
    count = len(view) // BLOCK_SIZE
    return BLOCK_TABLES[count].pack(*[_xxh3(view[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]) for i in range(count)])


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


def decode_header_unchecked(view):
    """Best-effort fields of a header whose checksum fails, for recovery to mark the range of
    a damaged durable record (reads then fail instead of returning older data). None when
    the magic, version or type are not even plausible."""
    if len(view) < HEADER_SIZE:
        return None
    fields = HEADER_BODY.unpack_from(view, 0)
    magic, version, record_type = fields[:3]
    if magic != MAGIC or version != VERSION or record_type not in _KNOWN_TYPES:
        return None
    return RecordHeader(fields[2:12])


def verify_payload(header, payload, path=None, offset=None):
    """Rule 6: the payload matches its header (and a raw EXTENT's blocks their table)."""
    if len(payload) != header[3]:
        raise CorruptionError("record payload length mismatch", path, offset)
    if header[0] == RecordType.EXTENT and not header[1] & FLAG_ZSTD:
        count = header[8] // BLOCK_SIZE
        if header[8] % BLOCK_SIZE or not 0 < count <= GROUP_BLOCKS or header[3] != count * RAW_BLOCK_BYTES:
            raise CorruptionError("raw extent record has impossible lengths", path, offset)
        verify_blocks(header, payload[:count * CHECKSUM_BYTES], payload[count * CHECKSUM_BYTES:], 0, count,
                      path, offset)
        return
    if _xxh3(payload) != header[9]:
        raise CorruptionError("record payload checksum mismatch", path, offset)


def verify_blocks(header, table, blocks, first_block, block_count, path=None, offset=None):
    """Check the table of a raw EXTENT against its header, then blocks [first, first+count)
    (given in `blocks`, starting with block `first`) against the table."""
    if _xxh3(table) != header[9]:
        raise CorruptionError("record block table checksum mismatch", path, offset)
    sums = BLOCK_TABLES[len(table) // CHECKSUM_BYTES].unpack(table)
    view = memoryview(blocks)
    for index in range(block_count):
        if _xxh3(view[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]) != sums[first_block + index]:
            raise CorruptionError(f"record block {first_block + index} checksum mismatch", path, offset)


def encode_commit(durable_address, seen):
    """A COMMIT's payload: the durable address, then {node: stamp} seen from other nodes."""
    return COMMIT_PAYLOAD.pack(durable_address) + b"".join(
        COMMIT_SEEN.pack(node, stamp) for node, stamp in sorted(seen.items())[:MAX_COMMIT_SEEN])


def commit_seen(payload):
    """{node: stamp} of a COMMIT's payload (empty for a plain 8-byte one, or None)."""
    if payload is None or len(payload) <= COMMIT_PAYLOAD.size:
        return {}
    return dict(COMMIT_SEEN.iter_unpack(payload[COMMIT_PAYLOAD.size:]))


def commit_payload_valid(length):
    extra = length - COMMIT_PAYLOAD.size
    return extra >= 0 and extra % COMMIT_SEEN.size == 0 and extra // COMMIT_SEEN.size <= MAX_COMMIT_SEEN


# ---- the compiled versions (format/fast.c) ----------------------------------------------
# The functions above are the reference, kept and tested against the C ones
# (tests/format/test_fast.py). The C ones serve when the extension is built (make install)
# and CHUNKVOL_PURE is not 1; modules that import these names bind them after this point.
REFERENCE = {"encode_header_into": encode_header_into, "encode_record_into": encode_record_into,
             "block_table": block_table, "decode_header": decode_header,
             "verify_blocks": verify_blocks}
try:
    from chunkvol.format import fast
except ImportError:  # not built: the reference serves
    fast = None
if fast is not None:
    fast.setup_record(RecordHeader, CorruptionError, FormatError, _KNOWN_TYPES,
                      (MAGIC, VERSION, HEADER_SIZE, BLOCK_SIZE, GROUP_BLOCKS, CHECKSUM_BYTES, MAX_PAYLOAD,
                       int(RecordType.EXTENT)), REFERENCE)
    if os.environ.get("CHUNKVOL_PURE") != "1":
        encode_header_into = fast.encode_header_into
        encode_record_into = fast.encode_record_into
        block_table = fast.block_table
        decode_header = fast.decode_header
        verify_blocks = fast.verify_blocks
