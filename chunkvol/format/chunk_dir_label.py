"""Chunk directory label: `chunkvol-chunks.json` in each of a pool's chunk directories.

A pool may keep chunks on several disks (`init --chunk-dir`). When one of them is not mounted
at the next open, its mount point is an empty directory, and an empty directory looks like one
that never received a chunk: the log would seem to end early and the writer would reuse the
missing chunks' ids. The label tells them apart, as the label on each device of a ZFS pool
does: every chunk directory of a pool holds one, so a directory without it is not the pool's.

UTF-8 JSON object (format/checked_json.py), published atomically:

| key       | type         | meaning                                              |
|-----------|--------------|------------------------------------------------------|
| format    | str          | "chunkvol-chunk-dir"                                 |
| version   | int          | 1                                                    |
| pool_uuid | str (32 hex) | the pool this directory belongs to                   |
| checksum  | str (16 hex) | xxh3-64 of the canonical JSON of every other key     |
"""

from chunkvol.errors import FormatError
from chunkvol.format import checked_json

NAME = "chunkvol-chunks.json"
FORMAT = "chunkvol-chunk-dir"
VERSION = 1


def encode(pool_uuid):
    return checked_json.encode(FORMAT, VERSION, {"pool_uuid": pool_uuid.hex()})


def decode(data, path=None):
    """The pool uuid (bytes) a label names; FormatError/CorruptionError for anything else."""
    fields = checked_json.decode(data, FORMAT, VERSION, path)
    try:
        pool_uuid = bytes.fromhex(fields["pool_uuid"])
    except (KeyError, TypeError, ValueError):
        raise FormatError("chunk directory label without a valid pool_uuid", path) from None
    if len(pool_uuid) != 16:
        raise FormatError("chunk directory label without a valid pool_uuid", path)
    return pool_uuid
