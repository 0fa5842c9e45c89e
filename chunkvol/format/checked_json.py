"""Small JSON documents with a checksum: the shape shared by the pool's own files
(pool.json, mirrors.json, mirrors/NAME.state). A file half-edited by hand, cut short or damaged is
refused with CorruptionError, never half-read.

UTF-8 JSON object with "format" (str), "version" (int), the document's keys, and "checksum":
16 hex digits of xxh3-64 over the canonical JSON (sorted keys, no spaces) of every other key.
"""

import json

import xxhash

from chunkvol.errors import CorruptionError, FormatError


def checksum(fields):
    """16 hex digits of xxh3-64 over the canonical JSON of every key but "checksum"."""
    body = {k: v for k, v in fields.items() if k != "checksum"}
    return format(xxhash.xxh3_64_intdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()), "016x")


def encode(kind, version, fields):
    fields = dict(fields, format=kind, version=version)
    fields["checksum"] = checksum(fields)
    return (json.dumps(fields, sort_keys=True, indent=2) + "\n").encode()


def decode(data, kind, version, path=None):
    try:
        fields = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"not valid JSON: {error}", path) from None
    if not isinstance(fields, dict) or fields.get("format") != kind:
        raise FormatError(f"not a {kind} file", path)
    if fields.get("version") != version:
        raise FormatError(f"unknown {kind} version {fields.get('version')!r}", path)
    if checksum(fields) != fields.get("checksum"):
        raise CorruptionError(f"{kind} checksum mismatch", path)
    return {k: v for k, v in fields.items() if k not in ("format", "version", "checksum")}
