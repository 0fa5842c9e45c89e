"""Stamped holes: the `tombstones` value in the LMDB `meta` database (index/tombstones.py).

Every ZERO (or trim) record applied in a pool that has peers leaves one: the block range it
covered and its stamp. A record of another node that arrives later and is older than a
tombstone over a block loses on that block (last writer wins, holes included). Written with
the checkpoint; records replayed after it add theirs again.

Little-endian:

| offset      | size | type | field   | meaning                                                  |
|------------:|-----:|------|---------|----------------------------------------------------------|
|           0 |    4 | 4s   | magic   | b"CVtb"                                                  |
|           4 |    4 | u32  | count   | entries (at most 1 << 22)                                |
|           8 | 40*n | ...  | entries | u32 volume, u32 origin node, u64 first block, u64 end block, u64 stamp, u64 commit stamp (its flush interval's COMMIT; 0: not ended) |
|    8 + 40*n |    8 | u64  | xxh3    | of every byte before it                                  |
"""

import struct

import xxhash

from chunkvol.errors import CorruptionError

MAGIC = b"CVtb"
HEAD = struct.Struct("<4sI")
ENTRY = struct.Struct("<IIQQQQ")
CHECK = struct.Struct("<Q")
MAX_ENTRIES = 1 << 22


def encode(entries):
    """`entries`: (volume, first block, end block, stamp, commit stamp, origin node) tuples."""
    body = HEAD.pack(MAGIC, len(entries)) + b"".join(ENTRY.pack(volume, node, first, end, stamp, commit)
                                                    for volume, first, end, stamp, commit, node in entries)
    return body + CHECK.pack(xxhash.xxh3_64_intdigest(body))


def decode(raw, path=None):
    raw = bytes(raw)
    if len(raw) < HEAD.size + CHECK.size:
        raise CorruptionError("tombstones entry is cut short", path)
    magic, count = HEAD.unpack_from(raw)
    if magic != MAGIC or count > MAX_ENTRIES or len(raw) != HEAD.size + count * ENTRY.size + CHECK.size:
        raise CorruptionError("tombstones entry is malformed", path)
    if xxhash.xxh3_64_intdigest(raw[:-CHECK.size]) != CHECK.unpack_from(raw, len(raw) - CHECK.size)[0]:
        raise CorruptionError("tombstones entry fails its checksum", path)
    entries = []
    for index in range(count):
        volume, node, first, end, stamp, commit = ENTRY.unpack_from(raw, HEAD.size + index * ENTRY.size)
        if end <= first:
            raise CorruptionError("tombstones entry holds an empty range", path)
        entries.append((volume, first, end, stamp, commit, node))
    return entries
