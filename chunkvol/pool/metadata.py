"""A pool directory's metadata: creating one (pool.json, the chunk directories and their
labels), reading and rewriting pool.json (format/pool_metadata.py), and POOL/lock, held by the
one process that writes the pool."""

import os
import uuid
from datetime import datetime, timezone

from chunkvol import locks
from chunkvol.clock import MAX_NODES, NODE_MASK
from chunkvol.errors import AlreadyExistsError, NotFoundError, UsageError
from chunkvol.format import chunk_dir_label, chunk_header, pool_metadata
from chunkvol.format.record import BLOCK_SIZE
from chunkvol.storage.files import LocalFiles

DEFAULT_CHUNK_SIZE = 8 << 30
CACHE_MODES = ("writeback", "none")
NAME = "pool.json"


def check_cache(cache):
    if cache not in CACHE_MODES:
        raise UsageError(f"cache must be one of {', '.join(CACHE_MODES)}")
    return cache


def create(path, chunk_size=DEFAULT_CHUNK_SIZE, chunk_dirs=None, files=None, node_id=None,
           cache="writeback", pool_uuid=None, mirror_of=None):
    """Make a pool directory; returns its absolute path. `pool_uuid` and `mirror_of` (the
    source's node id) make a mirror of another pool."""
    files = files or LocalFiles()
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, NAME)):
        raise AlreadyExistsError(f"a pool already exists at {path}")
    if not chunk_header.MIN_CAPACITY <= chunk_size <= chunk_header.MAX_CAPACITY // 2:
        raise UsageError("chunk size must be between 16M and 512G")
    if chunk_size % BLOCK_SIZE:
        raise UsageError("chunk size must be a multiple of 4096")
    check_cache(cache)
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"cannot create a pool at {path}: a file is in the way") from None
    pool_uuid = pool_uuid or uuid.uuid4().bytes
    directories = []
    for directory in chunk_dirs or ["chunks"]:
        absolute = os.path.join(path, directory)
        try:
            os.makedirs(absolute, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UsageError(f"cannot create chunk directory {absolute}: a file is in the way") from None
        files.publish(os.path.join(absolute, chunk_dir_label.NAME), chunk_dir_label.encode(pool_uuid))
        directories.append(directory if not os.path.isabs(directory) else absolute)
    fields = {
        "pool_uuid": pool_uuid.hex(),
        # A founding node has index 0 (clock.py); joined nodes and mirrors get others.
        "node_id": node_id or ((int.from_bytes(os.urandom(4), "little") & ~NODE_MASK) or MAX_NODES),
        "chunk_size": chunk_size,
        "chunk_dirs": directories,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if cache != "writeback":
        fields["cache"] = cache
    if mirror_of is not None:
        fields["role"], fields["mirror_of"] = "mirror", mirror_of
    files.publish(os.path.join(path, NAME), pool_metadata.encode(fields))
    return path


def read(path, files=None):
    """The fields of the pool.json of the pool at `path`."""
    files = files or LocalFiles()
    metadata_path = os.path.join(os.path.abspath(path), NAME)
    if not os.path.exists(metadata_path):
        raise NotFoundError(f"no pool at {os.path.abspath(path)} (run `chunkvol --pool {path} init`)")
    return pool_metadata.decode(files.read_file(metadata_path), metadata_path)


def drop_mirror_role(path, fields, files):
    """Publish pool.json without the mirror role (a mirror becomes a writing node); returns
    the new fields."""
    fields = {key: value for key, value in fields.items() if key not in ("role", "mirror_of", "checksum")}
    files.publish(os.path.join(path, NAME), pool_metadata.encode(fields))
    return fields


def take_pool_lock(path):
    """Hold POOL/lock for this process (locks.py)."""
    return locks.hold(os.path.join(path, "lock"), f"pool {path} is in use by another process (pid {{pid}}); "
                      "stop it, or use a read-only command")
