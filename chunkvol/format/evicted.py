"""Evicted-chunk manifest: `chunk-<id>.cvm`, in the chunk's directory in place of the chunk
file once its bytes live in an object store only (tiering, chunkvol/tiering.py).

The chunk's bytes are stored as objects of PIECE bytes each,
  chunkvol/POOL_UUID/chunks/NODE_ID/CHUNK_ID/PIECE
(NODE_ID and CHUNK_ID 16, PIECE 8 hex digits: chunk ids are per node, and the nodes of a pool
may well evict to one bucket), and the manifest keeps an xxh3-64 of every UNIT bytes
of the chunk, so each unit fetched from the store (or read back from the local cache) is
checked before any of it is used.

Layout, little-endian:

| offset | size   | type    | field        | meaning                                          |
|-------:|-------:|---------|--------------|--------------------------------------------------|
|      0 |      4 | 4s      | magic        | b"CVev"                                          |
|      4 |      1 | u8      | version      | 1                                                |
|      5 |      3 | -       | reserved     | 0                                                |
|      8 |     16 | 16s     | pool_uuid    |                                                  |
|     24 |      8 | u64     | node_id      | the node whose log the chunk is                  |
|     32 |      8 | u64     | chunk_id     |                                                  |
|     40 |      8 | u64     | size_bytes   | the chunk file's size when it was evicted        |
|     48 |      8 | u64     | capacity     | the chunk's capacity (from its header)           |
|     56 |      8 | u64     | created_hlc  | from the chunk's header                          |
|     64 |      4 | u32     | unit_bytes   | bytes per checked unit (1 MiB)                   |
|     68 |      4 | u32     | piece_bytes  | bytes per object (16 MiB), a multiple of unit    |
|     72 |      2 | u16     | url_length   |                                                  |
|     74 |      n | utf-8   | store_url    | `rados:...` or `s3:...`                          |
|   74+n |   8*u  | u64[u]  | unit_xxh3    | u = ceil(size_bytes / unit_bytes)                |
|    end |      8 | u64     | xxh3         | of every byte before it                          |

Version 2, for a chunk evicted to an encrypted mirror (its pieces sealed,
format/sealed_object.py), has after unit_xxh3, before the checksum:

|      . |      2 | u16     | key_length   |                                                  |
|      . |      k | utf-8   | key_path     | the mirror's key file (never the key itself)     |
|      . |     16 | 16s     | fingerprint  | the key's fingerprint (format/store_key.py)      |

Version 1 is still written (and read) for a chunk evicted without a key.
"""

import struct

import xxhash

from chunkvol.errors import CorruptionError, FormatError

MAGIC = b"CVev"
VERSION = 1
VERSION_SEALED = 2
HEAD = struct.Struct("<4sB3x16sQQQQQIIH")
KEY_LENGTH = struct.Struct("<H")
FINGERPRINT_BYTES = 16
CHECK = struct.Struct("<Q")
UNIT_BYTES = 1 << 20
PIECE_BYTES = 16 << 20
MAX_URL_BYTES = 4096
_xxh3 = xxhash.xxh3_64_intdigest


class Manifest:
    __slots__ = ("pool_uuid", "node_id", "chunk_id", "size_bytes", "capacity", "created_hlc", "unit_bytes",
                 "piece_bytes", "store_url", "unit_hashes", "key_path", "key_fingerprint")

    def __init__(self, pool_uuid, node_id, chunk_id, size_bytes, capacity, created_hlc, unit_bytes, piece_bytes,
                 store_url, unit_hashes, key_path=None, key_fingerprint=None):
        self.pool_uuid = pool_uuid
        self.node_id = node_id
        self.chunk_id = chunk_id
        self.size_bytes = size_bytes
        self.capacity = capacity
        self.created_hlc = created_hlc
        self.unit_bytes = unit_bytes
        self.piece_bytes = piece_bytes
        self.store_url = store_url
        self.unit_hashes = unit_hashes
        self.key_path = key_path  # the key file of an encrypted mirror's store, or None
        self.key_fingerprint = key_fingerprint

    def piece_name(self, piece):
        return piece_name(self.pool_uuid, self.node_id, self.chunk_id, piece)


def chunk_prefix(pool_uuid, node_id, chunk_id):
    """What every piece of one evicted chunk is named with."""
    return f"chunkvol/{pool_uuid.hex()}/chunks/{node_id:016x}/{chunk_id:016x}/"


def piece_name(pool_uuid, node_id, chunk_id, piece):
    return f"{chunk_prefix(pool_uuid, node_id, chunk_id)}{piece:08x}"


def unit_count(size_bytes, unit_bytes=UNIT_BYTES):
    return -(-size_bytes // unit_bytes)


def hash_unit(data):
    return _xxh3(data)


def encode(manifest):
    url = manifest.store_url.encode()
    version = VERSION if manifest.key_path is None else VERSION_SEALED
    head = HEAD.pack(MAGIC, version, manifest.pool_uuid, manifest.node_id, manifest.chunk_id, manifest.size_bytes,
                     manifest.capacity,
                     manifest.created_hlc, manifest.unit_bytes, manifest.piece_bytes, len(url))
    body = head + url + struct.pack(f"<{len(manifest.unit_hashes)}Q", *manifest.unit_hashes)
    if manifest.key_path is not None:
        key_path = manifest.key_path.encode()
        body += KEY_LENGTH.pack(len(key_path)) + key_path + bytes.fromhex(manifest.key_fingerprint)
    return body + CHECK.pack(_xxh3(body))


def decode(data, path=None):
    if len(data) < HEAD.size + CHECK.size:
        raise CorruptionError("evicted-chunk manifest cut short", path)
    if _xxh3(data[:-CHECK.size]) != CHECK.unpack_from(data, len(data) - CHECK.size)[0]:
        raise CorruptionError("evicted-chunk manifest checksum mismatch", path)
    (magic, version, pool_uuid, node_id, chunk_id, size_bytes, capacity, created_hlc, unit_bytes, piece_bytes,
     url_length) = HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise FormatError("not an evicted-chunk manifest", path)
    if version not in (VERSION, VERSION_SEALED):
        raise FormatError(f"unknown evicted-chunk manifest version {version}", path)
    units = unit_count(size_bytes, unit_bytes) if unit_bytes else -1
    hashes_end = HEAD.size + url_length + 8 * units
    key_path = fingerprint = None
    key_bytes = 0
    if version == VERSION_SEALED and len(data) >= hashes_end + KEY_LENGTH.size:
        key_length = KEY_LENGTH.unpack_from(data, hashes_end)[0]
        key_bytes = KEY_LENGTH.size + key_length + FINGERPRINT_BYTES
        if key_length <= MAX_URL_BYTES and len(data) == hashes_end + key_bytes + CHECK.size:
            start = hashes_end + KEY_LENGTH.size
            key_path = data[start:start + key_length].decode("utf-8", errors="strict")
            fingerprint = bytes(data[start + key_length:start + key_length + FINGERPRINT_BYTES]).hex()
    if (not unit_bytes or not piece_bytes or piece_bytes % unit_bytes or url_length > MAX_URL_BYTES
            or size_bytes > capacity or len(data) != hashes_end + key_bytes + CHECK.size
            or (version == VERSION_SEALED and key_path is None)):
        raise CorruptionError("evicted-chunk manifest fields are out of range", path)
    url = data[HEAD.size:HEAD.size + url_length].decode("utf-8", errors="strict")
    hashes = struct.unpack_from(f"<{units}Q", data, HEAD.size + url_length)
    return Manifest(pool_uuid, node_id, chunk_id, size_bytes, capacity, created_hlc, unit_bytes, piece_bytes, url,
                    hashes, key_path, fingerprint)
