"""Replication frames between two nodes of a pool, inside mutual TLS (mirror/identity.py).

Every frame, little-endian:

| offset | size | type | field   | meaning                                                   |
|-------:|-----:|------|---------|-----------------------------------------------------------|
|      0 |    4 | 4s   | magic   | b"CVw1"                                                   |
|      4 |    1 | u8   | kind    | 1 HELLO, 2 WELCOME, 3 BATCH, 4 ACK, 5 ERROR, 6 FETCH, 7 RECORD |
|      5 |    3 | 3s   | zero    | 0                                                         |
|      8 |    4 | u32  | length  | payload bytes, at most MAX_PAYLOAD                        |
|     12 |    8 | u64  | xxh3    | xxh3-64 of the payload                                    |
|     20 |    n |      | payload |                                                           |

Payloads: HELLO (client: {"pool_uuid", "node_id", "version"}), WELCOME (server: {"pool_uuid",
"node_id", "have"}: the greatest sequence of the client's records the server holds), ACK
({"have"}) and ERROR ({"error": kind, "message"}) are UTF-8 JSON objects. BATCH is u64
origin node, u32 record count, then per record u32 length and the record's bytes exactly as
in the log (format/record.py), which the receiver checks again (mirror/receiver.py).

FETCH ({"volumes": [ids], "group", "ref": [address, stored, stamp, flags], "offset"}) asks for
a good copy of a record (self-healing, heal.py); RECORD carries its bytes (empty: not here).

A conversation: HELLO -> WELCOME, then BATCH -> ACK or FETCH -> RECORD (or ERROR, after which
the server closes), repeated. Every length is checked before anything is allocated.
"""

import json
import struct

import xxhash

from chunkvol.errors import PeerError

MAGIC = b"CVw1"
HEAD = struct.Struct("<4sB3sIQ")
HELLO, WELCOME, BATCH, ACK, ERROR, FETCH, RECORD = 1, 2, 3, 4, 5, 6, 7
KINDS = (HELLO, WELCOME, BATCH, ACK, ERROR, FETCH, RECORD)
MAX_PAYLOAD = 64 << 20
MAX_JSON = 64 << 10
BATCH_HEAD = struct.Struct("<QI")
RECORD_LENGTH = struct.Struct("<I")
VERSION = 1


def encode(kind, payload):
    return HEAD.pack(MAGIC, kind, b"\0\0\0", len(payload), xxhash.xxh3_64_intdigest(payload)) + payload


def encode_json(kind, document):
    return encode(kind, json.dumps(document, sort_keys=True).encode())


def decode_head(raw):
    """(kind, length, checksum) of a frame head, or PeerError."""
    magic, kind, zero, length, checksum = HEAD.unpack(raw)
    if magic != MAGIC or zero != b"\0\0\0" or kind not in KINDS:
        raise PeerError("not a chunkvol replication frame")
    if length > (MAX_PAYLOAD if kind in (BATCH, RECORD) else MAX_JSON):
        raise PeerError(f"a frame of {length} bytes is over the limit")
    return kind, length, checksum


def check_payload(payload, checksum):
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise PeerError("a frame's payload does not match its checksum")


def decode_json(payload):
    try:
        document = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PeerError("a frame's JSON is malformed") from None
    if not isinstance(document, dict):
        raise PeerError("a frame's JSON is not an object")
    return document


def encode_batch(origin, records):
    parts = [BATCH_HEAD.pack(origin, len(records))]
    for raw in records:
        parts.append(RECORD_LENGTH.pack(len(raw)))
        parts.append(raw)
    return encode(BATCH, b"".join(parts))


def decode_batch(payload):
    """(origin, [record views]); PeerError when the lengths do not add up."""
    view = memoryview(payload)
    if len(view) < BATCH_HEAD.size:
        raise PeerError("a batch frame is cut short")
    origin, count = BATCH_HEAD.unpack_from(view)
    position = BATCH_HEAD.size
    records = []
    for _ in range(count):
        if position + RECORD_LENGTH.size > len(view):
            raise PeerError("a batch frame is cut short")
        (length,) = RECORD_LENGTH.unpack_from(view, position)
        position += RECORD_LENGTH.size
        if position + length > len(view):
            raise PeerError("a batch frame's record runs past its end")
        records.append(view[position:position + length])
        position += length
    if position != len(view):
        raise PeerError("a batch frame has bytes after its records")
    return origin, records
