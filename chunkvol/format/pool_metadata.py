"""Pool metadata: `pool.json` at the top of a pool directory.

UTF-8 JSON object, published atomically (temp, fsync, rename, fsync dir):

| key          | type            | meaning                                                  |
|--------------|-----------------|----------------------------------------------------------|
| format       | str             | "chunkvol-pool"                                          |
| version      | int             | 1                                                        |
| pool_uuid    | str (32 hex)    | identity of the pool; every chunk header repeats it      |
| node_id      | int (1..2^32-1) | this node's id: origin of the records it writes          |
| chunk_size   | int             | capacity of new chunks in bytes                          |
| chunk_dirs   | list of str     | directories holding chunk files (absolute, or relative to the pool) |
| created      | str             | ISO-8601 UTC time of `init`                              |
| cache        | str, optional   | "writeback" (default) or "none": log writes through the page cache or O_DIRECT |
| role         | str, optional   | "mirror": takes changes only from its source (`mirror promote` removes it) |
| mirror_of    | int, optional   | the source's node id, for a mirror                       |
| retention    | object, optional| seconds: {"all", "hourly", "daily"} (history.py; default 1h, 1d, 30d) |
| max_clock_skew_seconds | number, optional | how far ahead of this node's clock a received record's stamp may be (default 60) |
| checksum     | str (16 hex)    | xxh3-64 of the canonical JSON of every other key         |

The checksum catches a half-edited or damaged file; unknown format or version is refused.
"""

import json

from chunkvol.errors import CorruptionError, FormatError
from chunkvol.format import checked_json

FORMAT = "chunkvol-pool"
VERSION = 1
REQUIRED = {"format": str, "version": int, "pool_uuid": str, "node_id": int,
            "chunk_size": int, "chunk_dirs": list, "created": str, "checksum": str}


def encode(fields):
    return checked_json.encode(FORMAT, VERSION, fields)


def decode(data, path=None):
    try:
        fields = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"pool metadata is not valid JSON: {error}", path) from None
    if not isinstance(fields, dict) or fields.get("format") != FORMAT:
        raise FormatError("not a chunkvol pool metadata file", path)
    if fields.get("version") != VERSION:
        raise FormatError(f"unknown pool format version {fields.get('version')!r}", path)
    for key, kind in REQUIRED.items():
        if not isinstance(fields.get(key), kind):
            raise FormatError(f"pool metadata field {key!r} missing or of the wrong type", path)
    if checked_json.checksum(fields) != fields["checksum"]:
        raise CorruptionError("pool metadata checksum mismatch", path)
    try:
        pool_uuid = bytes.fromhex(fields["pool_uuid"])
    except ValueError:
        pool_uuid = b""
    if len(pool_uuid) != 16 or not 0 < fields["node_id"] < 2**32:
        raise FormatError("pool metadata has an invalid pool_uuid or node_id", path)
    if fields.get("cache", "writeback") not in ("writeback", "none"):
        raise FormatError("pool metadata field 'cache' must be writeback or none", path)
    if fields.get("role", "primary") not in ("primary", "mirror"):
        raise FormatError("pool metadata field 'role' must be primary or mirror", path)
    retention = fields.get("retention")
    if retention is not None and (not isinstance(retention, dict) or set(retention) != {"all", "hourly", "daily"}
                                  or not all(isinstance(v, int) and v >= 0 for v in retention.values())):
        raise FormatError("pool metadata field 'retention' must map all, hourly, daily to seconds", path)
    return fields
