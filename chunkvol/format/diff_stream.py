"""Diff stream: the changes between two points of a volume, as `snapshot export-diff` writes
them and `snapshot import-diff` applies them to a volume of another pool (incremental backup,
in the manner of `rbd export-diff`).

A stream is a header, entries in increasing offset order, and an END entry.

Header:

| offset | size | type  | field      | meaning                                             |
|-------:|-----:|-------|------------|-----------------------------------------------------|
|      0 |    8 | 8s    | magic      | b"CVdiff\\x00\\x01"                                   |
|      8 |    4 | u32   | json_len   | bytes of the description that follows (<= 64 KiB)  |
|     12 |    n | JSON  | description| {"volume", "size", "from", "to", "from_stamp", "to_stamp", "pool_uuid"}; `from` null: a full image |
|   12+n |    8 | u64   | xxh3       | xxh3-64 of bytes 0 .. 12+n                          |

Entry (40-byte head, then `stored` payload bytes), little-endian:

| offset | size | type | field    | meaning                                                   |
|-------:|-----:|------|----------|-----------------------------------------------------------|
|      0 |    4 | 4s   | tag      | b"DATA" (bytes), b"ZERO" (reads as zeros), b"END!"        |
|      4 |    8 | u64  | offset   | byte offset in the volume (END: number of entries before) |
|     12 |    8 | u64  | length   | bytes covered; DATA: at most MAX_DATA                     |
|     20 |    4 | u32  | stored   | payload bytes (ZERO, END: 0)                              |
|     24 |    4 | u32  | flags    | bit 0: the payload is one zstd frame                      |
|     32 |    8 | u64  | xxh3     | xxh3-64 of head bytes 0..31 and the payload               |

Offsets and lengths are multiples of 4096; entries never overlap and come in order. A reader
checks every field before it allocates or decompresses anything.
"""

import json
import struct

import xxhash
import zstandard

from chunkvol.errors import FormatError

MAGIC = b"CVdiff\x00\x01"
HEAD = struct.Struct("<8sI")
ENTRY = struct.Struct("<4sQQII4x")
CHECK = struct.Struct("<Q")
assert ENTRY.size == 32
MAX_DESCRIPTION = 64 << 10
MAX_DATA = 4 << 20
MAX_STORED = MAX_DATA + (64 << 10)
FLAG_ZSTD = 1
DATA, ZERO, END = b"DATA", b"ZERO", b"END!"
ALIGN = 4096


def encode_header(description):
    body = json.dumps(description, sort_keys=True).encode()
    head = HEAD.pack(MAGIC, len(body)) + body
    return head + CHECK.pack(xxhash.xxh3_64_intdigest(head))


def encode_entry(tag, offset, length, payload=b"", flags=0):
    head = ENTRY.pack(tag, offset, length, len(payload), flags)
    hasher = xxhash.xxh3_64(head)
    hasher.update(payload)
    return head + CHECK.pack(hasher.intdigest()) + payload


class Reader:
    """Reads and checks a stream from a binary file object."""

    def __init__(self, stream, name="diff stream"):
        self.stream = stream
        self.name = name
        self.decompressor = zstandard.ZstdDecompressor()
        self.position = 0
        self.entries = 0

    def _read(self, count, what):
        data = self.stream.read(count)
        if data is None or len(data) != count:
            raise FormatError(f"{self.name}: cut short in {what} at byte {self.position}")
        self.position += count
        return data

    def header(self):
        head = self._read(HEAD.size, "the header")
        magic, length = HEAD.unpack(head)
        if magic != MAGIC:
            raise FormatError(f"{self.name}: not a chunkvol diff stream (bad magic)")
        if length > MAX_DESCRIPTION:
            raise FormatError(f"{self.name}: header description of {length} bytes is too long")
        body = self._read(length, "the header")
        (check,) = CHECK.unpack(self._read(CHECK.size, "the header"))
        if xxhash.xxh3_64_intdigest(head + body) != check:
            raise FormatError(f"{self.name}: header fails its checksum")
        try:
            description = json.loads(body)
        except ValueError:
            raise FormatError(f"{self.name}: header is not JSON") from None
        size = description.get("size") if isinstance(description, dict) else None
        if not isinstance(size, int) or size <= 0 or size % ALIGN or not isinstance(description.get("volume"), str):
            raise FormatError(f"{self.name}: header describes no valid volume")
        self.size = size
        self.last_end = 0
        return description

    def entries_of(self):
        """Yield (tag, offset, length, data-or-None) until END (checked, then returned)."""
        while True:
            head = self._read(ENTRY.size, "an entry")
            tag, offset, length, stored, flags = ENTRY.unpack(head)
            (check,) = CHECK.unpack(self._read(CHECK.size, "an entry"))
            if tag == END:
                if xxhash.xxh3_64_intdigest(head) != check or offset != self.entries:
                    raise FormatError(f"{self.name}: bad end marker (stream damaged or cut)")
                return
            if tag not in (DATA, ZERO) or offset % ALIGN or length % ALIGN or not length \
                    or offset < self.last_end or offset + length > self.size:
                raise FormatError(f"{self.name}: bad entry at byte {self.position - ENTRY.size - CHECK.size}")
            if tag == ZERO and (stored or flags):
                raise FormatError(f"{self.name}: ZERO entry with a payload")
            if tag == DATA and (length > MAX_DATA or stored > MAX_STORED or flags & ~FLAG_ZSTD
                                or (not flags & FLAG_ZSTD and stored != length)):
                raise FormatError(f"{self.name}: DATA entry with bad sizes at offset {offset}")
            payload = self._read(stored, "a payload") if stored else b""
            hasher = xxhash.xxh3_64(head)
            hasher.update(payload)
            if hasher.intdigest() != check:
                raise FormatError(f"{self.name}: entry at volume offset {offset} fails its checksum")
            data = None
            if tag == DATA:
                data = self._decompress(payload, length, offset) if flags & FLAG_ZSTD else payload
            self.last_end = offset + length
            self.entries += 1
            yield tag, offset, length, data

    def _decompress(self, frame, length, offset):
        if zstandard.frame_content_size(frame) != length:
            raise FormatError(f"{self.name}: compressed entry at offset {offset} declares another size")
        try:
            data = self.decompressor.decompress(frame, max_output_size=length)
        except zstandard.ZstdError as error:
            raise FormatError(f"{self.name}: entry at offset {offset} does not decompress ({error})") from None
        if len(data) != length:
            raise FormatError(f"{self.name}: entry at offset {offset} holds {len(data)} bytes, expected {length}")
        return data
