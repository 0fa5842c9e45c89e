"""Base: the block map written into the log, so that chunks freed by compaction are not needed
to rebuild it. Payloads of the BASE and BASE_END records (format/record.py).

Compaction copies the live records out of its victim chunks, points the block map at the
copies, checkpoints it at log address P, and then writes everything the map holds as of P
(group versions, flush-point history, volumes, snapshots, and in pools with peers what
last-writer-wins needs: origin stamps, tombstones, conflicts) as BASE records, closed by one
BASE_END. Only after that is durable are the victims deleted. A rebuild loads the newest
complete base and replays the log from P; without one it replays from the first chunk, which
must then be chunk 1.

BASE payload (little-endian):

| offset | size | type | field          | meaning                                         |
|-------:|-----:|------|----------------|-------------------------------------------------|
|      0 |    8 | u64  | base_address   | P: the log address the base summarizes          |
|      8 |    4 | u32  | fragment_index | 0, 1, 2, ...                                    |
|     12 |    4 | u32  | entry_count    |                                                 |
|     16 |    . |      | entries        | per entry: u8 db (1 groups, 2 history, 3 volumes, 4 snapshots, 5 meta, 6 conflicts), u8 0, u16 key_len, u32 value_len, key, value |

Meta entries are the keys `origins` and `origin_stamps` as LMDB holds them, and the tombstones
(format/tombstones.py) cut into values of at most 1000 entries under the keys `tombstones/0`,
`tombstones/1`, ... (one LMDB value could outgrow a fragment); a rebuild joins them.

BASE_END payload:

| offset | size | type    | field           | meaning                                          |
|-------:|-----:|---------|-----------------|--------------------------------------------------|
|      0 |   80 | bytes   | checkpoint      | format/checkpoint.py, log_address = P            |
|     80 |    4 | u32     | fragment_count  | n                                                |
|     84 |    4 | u32     | levels          | 0: `fragments` are the BASE records; 1: they are index fragments |
|     88 |  8*n | u64[n]  | fragments       | log address of each BASE record, in index order  |

A map larger than MAX_FRAGMENTS fragments (about 480 MB of entries, some 6.6 million group
versions) is listed through one level of index fragments: BASE records whose payload is the
fragment head (P, index in the index level, address count) followed by up to
INDEX_ADDRESSES u64 addresses of data fragments, in order. One BASE_END then reaches
MAX_FRAGMENTS * INDEX_ADDRESSES fragments (about 3.7 TB of map): no pool of a supported size
comes near. Levels above 1 are refused as a format this build does not know.

The record headers carry P in offset_bytes as well. Every record is checksummed (record.py);
a base is used only if its BASE_END and every fragment it lists are valid and name the same P.
"""

import struct

from chunkvol.errors import FormatError

FRAGMENT_HEAD = struct.Struct("<QII")
ENTRY_HEAD = struct.Struct("<BBHI")
END_HEAD = struct.Struct("<II")
CHECKPOINT_BYTES = 80
FRAGMENT_BYTES = 60 << 10  # stays below a record's payload limit
MAX_FRAGMENTS = (64 << 10) // 8  # the BASE_END payload stays below the limit too
INDEX_ADDRESSES = (FRAGMENT_BYTES - FRAGMENT_HEAD.size) // 8  # data fragments one index fragment lists
DB_GROUPS, DB_HISTORY, DB_VOLUMES, DB_SNAPSHOTS = 1, 2, 3, 4
DB_META = 5  # origins and origin stamps (format/origins.py), tombstones; the checkpoint is in BASE_END
DB_CONFLICTS = 6
DATABASES = (DB_GROUPS, DB_HISTORY, DB_VOLUMES, DB_SNAPSHOTS, DB_META, DB_CONFLICTS)


def fragments(base_address, entries):
    """Encode (db, key, value) entries into fragment payloads of at most FRAGMENT_BYTES."""
    index = 0
    body = bytearray()
    count = 0
    for db, key, value in entries:
        entry = ENTRY_HEAD.pack(db, 0, len(key), len(value)) + key + value
        if body and len(body) + len(entry) > FRAGMENT_BYTES - FRAGMENT_HEAD.size:
            yield FRAGMENT_HEAD.pack(base_address, index, count) + bytes(body)
            index += 1
            body = bytearray()
            count = 0
        body += entry
        count += 1
    if body or index == 0:
        yield FRAGMENT_HEAD.pack(base_address, index, count) + bytes(body)


def _fragment_count(payload, base_address, index, kind):
    """The entry (or address) count of a fragment whose head says it is where it should be."""
    if len(payload) < FRAGMENT_HEAD.size:
        raise FormatError(f"base {kind} too short")
    address, found_index, count = FRAGMENT_HEAD.unpack_from(payload)
    if address != base_address or found_index != index:
        raise FormatError(f"base {kind} {found_index} of base {address:#x} found where {kind} {index} "
                          f"of base {base_address:#x} was expected")
    return count


def decode_fragment(payload, base_address, index):
    """The (db, key, value) entries of one fragment, checked against where it should be."""
    count = _fragment_count(payload, base_address, index, "fragment")
    entries = []
    position = FRAGMENT_HEAD.size
    for _ in range(count):
        if position + ENTRY_HEAD.size > len(payload):
            raise FormatError("base fragment entry runs past the fragment")
        db, _, key_length, value_length = ENTRY_HEAD.unpack_from(payload, position)
        position += ENTRY_HEAD.size
        end = position + key_length + value_length
        if db not in DATABASES or end > len(payload):
            raise FormatError("base fragment entry is malformed")
        entries.append((db, bytes(payload[position:position + key_length]),
                        bytes(payload[position + key_length:end])))
        position = end
    if position != len(payload):
        raise FormatError("base fragment has trailing bytes")
    return entries


def index_fragments(base_address, fragment_addresses):
    """Payloads of the index fragments listing `fragment_addresses`, INDEX_ADDRESSES each."""
    for index, start in enumerate(range(0, len(fragment_addresses), INDEX_ADDRESSES)):
        part = fragment_addresses[start:start + INDEX_ADDRESSES]
        yield FRAGMENT_HEAD.pack(base_address, index, len(part)) + struct.pack(f"<{len(part)}Q", *part)


def decode_index_fragment(payload, base_address, index):
    """The data fragment addresses one index fragment lists, checked against where it should be."""
    count = _fragment_count(payload, base_address, index, "index fragment")
    if count > INDEX_ADDRESSES or len(payload) != FRAGMENT_HEAD.size + 8 * count:
        raise FormatError("base index fragment has a bad length")
    return list(struct.unpack_from(f"<{count}Q", payload, FRAGMENT_HEAD.size))


def encode_end(checkpoint_bytes, fragment_addresses, levels=0):
    """`levels` 1: `fragment_addresses` are those of index fragments (index_fragments)."""
    if len(checkpoint_bytes) != CHECKPOINT_BYTES:
        raise ValueError("checkpoint must be 80 bytes")
    if levels not in (0, 1):
        raise ValueError("a base has 0 or 1 levels of index")
    if len(fragment_addresses) > MAX_FRAGMENTS:
        raise FormatError(f"the block map is too large for one base ({len(fragment_addresses)} fragments "
                          f"at index level {levels})")
    return (checkpoint_bytes + END_HEAD.pack(len(fragment_addresses), levels)
            + struct.pack(f"<{len(fragment_addresses)}Q", *fragment_addresses))


def decode_end(payload):
    """(checkpoint bytes, [addresses], levels): with levels 1, the addresses are those of
    index fragments."""
    if len(payload) < CHECKPOINT_BYTES + END_HEAD.size:
        raise FormatError("base end record too short")
    count, levels = END_HEAD.unpack_from(payload, CHECKPOINT_BYTES)
    if levels not in (0, 1):
        raise FormatError(f"base end record with {levels} levels of index (a newer format?)")
    if count > MAX_FRAGMENTS or len(payload) != CHECKPOINT_BYTES + END_HEAD.size + 8 * count:
        raise FormatError("base end record has a bad length")
    addresses = struct.unpack_from(f"<{count}Q", payload, CHECKPOINT_BYTES + END_HEAD.size)
    return bytes(payload[:CHECKPOINT_BYTES]), list(addresses), levels
