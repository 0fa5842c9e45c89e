"""Tiering: a chunk whose records are all in an object store may leave the local disk.

Evicting chunk N to an object-store mirror's store takes three steps:
1. Upload (any process, the pool may be served meanwhile): the chunk file is read in pieces
   of 16 MiB, each stored as one object (format/evicted.py gives the names), hashing every
   1 MiB unit; then the manifest with those hashes is published beside the chunk file as
   `chunk-N.cvm`. While the chunk file is still there, the file wins (storage/chunks.py).
2. Switch (in the process that holds the pool: the server, over the control socket): under
   the pool lock the conditions are checked again, the chunk table reads the chunk through
   the manifest from now on, and the chunk file is deleted.
3. Reads of the chunk fetch 1 MiB units from the store into a local cache, checked against
   the manifest (storage/remote_chunks.py).

To an encrypted mirror (`mirror add --key`), the pieces are sealed with the mirror's key
(objstore/sealed_store.py: one frame per 1 MiB unit, so a read still fetches one unit), and
the manifest names the key file and its fingerprint, never the key.

A chunk may be evicted when it is sealed (an older chunk than the one being written), older
than the chunk holding the last checkpoint (the switch makes a checkpoint if needed, so
recovery never scans an evicted chunk), and every mirror's
cursor is past it, among them an object-store mirror whose store receives the chunk: so its
records are in that store's segments, and `restore` needs nothing from this disk.
A policy (`chunk policy --keep-under SIZE`) is applied by the shipper process of `serve`
after each shipping pass: oldest chunks first, until local chunk bytes are under SIZE.
"""

import os
import time

from chunkvol import objstore
from chunkvol.errors import ChunkvolError, NotFoundError, UsageError
from chunkvol.format import chunk_header, evicted, tiering_policy
from chunkvol.mirror import config as mirror_config
from chunkvol.mirror.source import LogSource
from chunkvol.objstore.keys import load_key
from chunkvol.objstore.sealed_store import open_pool
from chunkvol.storage.chunks import manifest_name
from chunkvol.storage.files import LocalFiles


def object_mirrors(pool_path, files=None):
    """{name: (store url, cursor chunk)} of the pool's object-store mirrors."""
    found = {}
    for name, definition in mirror_config.load_mirrors(pool_path, files).items():
        if definition["to"].startswith(("rados:", "s3:")):
            state = mirror_config.load_state(pool_path, name, chunk_header.address(1, chunk_header.DATA_OFFSET), files)
            found[name] = (definition["to"], chunk_header.split_address(state["cursor"])[0])
    return found


def choose_store(pool_path, mirror_name=None, files=None):
    """The store URL to evict to: the named object-store mirror's, or the only one."""
    mirrors = object_mirrors(pool_path, files)
    if mirror_name is not None:
        if mirror_name not in mirrors:
            raise NotFoundError(f"no object-store mirror {mirror_name!r} (object-store mirrors: "
                                f"{', '.join(sorted(mirrors)) or 'none'})")
        return mirrors[mirror_name][0]
    if not mirrors:
        raise UsageError("eviction needs an object-store mirror: `mirror add NAME --to rados:...|s3:...` first")
    if len(mirrors) > 1:
        raise UsageError(f"several object-store mirrors ({', '.join(sorted(mirrors))}): name one with --mirror")
    return next(iter(mirrors.values()))[0]


def refusal(pool_path, chunk_id, store_url, current_chunk, checkpoint_chunk, files=None):
    """Why chunk `chunk_id` may not be evicted to `store_url` now (None: it may)."""
    if chunk_id >= current_chunk:
        return f"chunk {chunk_id} is the one being written (or newer): only sealed chunks leave"
    if chunk_id >= checkpoint_chunk:
        return (f"chunk {chunk_id} is not older than the last checkpoint's chunk ({checkpoint_chunk}): recovery "
                "may read it")
    held = mirror_config.held_chunk(pool_path, files)
    if held is not None and held <= chunk_id:
        return f"a mirror has not shipped chunk {chunk_id} yet (`mirror status`)"
    shipped = [cursor_chunk for url, cursor_chunk in object_mirrors(pool_path, files).values() if url == store_url]
    if not shipped:
        return f"{store_url} is not the store of an object-store mirror of this pool"
    return None


def upload(pool_uuid, node_id, chunk, store_url, files=None, progress=None, key=None):
    """Store a local chunk's bytes as pieces in the store (sealed with StoreKey `key`, if
    given); publish and return its manifest path."""
    files = files or LocalFiles()
    store = objstore.open_store(store_url)
    hashes = []
    try:
        store = open_pool(store, pool_uuid, key)  # the mirror's pool there: refused if the key does not fit
        for piece, start in enumerate(range(0, chunk.size_bytes, evicted.PIECE_BYTES)):
            data = files.pread(chunk.fd, min(evicted.PIECE_BYTES, chunk.size_bytes - start), start)
            if start + len(data) != min(chunk.size_bytes, start + evicted.PIECE_BYTES):
                raise OSError(f"chunk {chunk.chunk_id} is shorter than its table says")
            view = memoryview(data)
            hashes.extend(evicted.hash_unit(view[offset:offset + evicted.UNIT_BYTES])
                          for offset in range(0, len(data), evicted.UNIT_BYTES))
            name = evicted.piece_name(pool_uuid, node_id, chunk.chunk_id, piece)
            store.put(name, data)
            if store.size(name) != len(data):
                raise OSError(f"{store_url}: {name} was not stored whole")
            if progress is not None:
                progress(len(data))
    finally:
        store.close()
    manifest = evicted.Manifest(pool_uuid, node_id, chunk.chunk_id, chunk.size_bytes, chunk.capacity_bytes,
                                chunk.created_hlc, evicted.UNIT_BYTES, evicted.PIECE_BYTES, store_url, tuple(hashes),
                                key and key.path, key and key.fingerprint)
    path = os.path.join(os.path.dirname(chunk.path), manifest_name(chunk.chunk_id))
    files.publish(path, evicted.encode(manifest))
    return path


def delete_evicted_objects(manifests):
    """Delete the pieces of evicted chunks that compaction has freed. Returns (objects deleted,
    [{"chunk", "store", "error"}] for chunks whose objects could not all be deleted)."""
    deleted, left, stores = 0, [], {}
    try:
        for manifest in manifests:
            try:
                store = stores.get(manifest.store_url) or stores.setdefault(
                    manifest.store_url, objstore.open_store(manifest.store_url))
                for piece in range(-(-manifest.size_bytes // manifest.piece_bytes)):
                    store.delete(manifest.piece_name(piece))
                    deleted += 1
            except ChunkvolError as error:
                left.append({"chunk": manifest.chunk_id, "store": manifest.store_url, "error": str(error)})
    finally:
        for store in stores.values():
            store.close()
    return deleted, left


def switch(pool, chunk_id):
    """Step 2, in the process holding the pool: read chunk `chunk_id` through its published
    manifest from now on and delete its file. Returns what was freed."""
    with pool.lock:
        chunk = pool.chunks.get(chunk_id)
        if chunk.remote is not None:
            return {"chunk": chunk_id, "freed_bytes": 0, "store": chunk.remote.manifest.store_url}
        path = os.path.join(os.path.dirname(chunk.path), manifest_name(chunk_id))
        if not os.path.exists(path):
            raise NotFoundError(f"chunk {chunk_id} has no uploaded manifest ({path}): `chunk evict` uploads first")
        manifest = evicted.decode(pool.files.read_file(path), path)
        if (manifest.pool_uuid != pool.pool_uuid or manifest.node_id != pool.node_id
                or manifest.chunk_id != chunk_id or manifest.size_bytes != chunk.size_bytes):
            raise UsageError(f"the manifest {path} does not describe chunk {chunk_id} as it is now")
        checkpoint = pool.blockmap.read_checkpoint()
        checkpoint_chunk = chunk_header.split_address(checkpoint.log_address)[0] if checkpoint else 0
        if checkpoint_chunk <= chunk_id < pool.writer.chunk.chunk_id:
            pool.checkpoint()  # so that recovery starts after the chunk that leaves
            checkpoint_chunk = chunk_header.split_address(pool.blockmap.read_checkpoint().log_address)[0]
        why = refusal(pool.path, chunk_id, manifest.store_url, pool.writer.chunk.chunk_id, checkpoint_chunk,
                      pool.files)
        if why is not None:
            raise UsageError(why)
        file_path, size = chunk.path, chunk.size_bytes
        pool.chunks.evicted(chunk_id, path)
        pool.files.remove(file_path)
        pool.files.fsync_directory(os.path.dirname(file_path))
        return {"chunk": chunk_id, "freed_bytes": size, "store": manifest.store_url}


def candidates(pool_path, chunks, current_chunk, checkpoint_chunk, store_url, files=None):
    """Local chunks that may be evicted to `store_url` now, oldest first."""
    return [chunk for chunk_id, chunk in sorted(chunks.items())
            if chunk.remote is None
            and refusal(pool_path, chunk_id, store_url, current_chunk, checkpoint_chunk, files) is None]


def local_bytes(chunks):
    return sum(chunk.size_bytes for chunk in chunks.values() if chunk.remote is None)


def load_policy(pool_path, files=None):
    path = os.path.join(pool_path, "tiering.json")
    if not os.path.exists(path):
        return None
    return tiering_policy.decode((files or LocalFiles()).read_file(path), path)


def save_policy(pool_path, policy, files=None):
    path = os.path.join(pool_path, "tiering.json")
    if policy is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    (files or LocalFiles()).publish(path, tiering_policy.encode(dict(policy, updated=time.time())))


def evict(pool_path, fields, chunk_ids, store_url, switch_call, files=None, progress=None):
    """Upload each chunk (unless its manifest is already there) and have the pool's holder
    switch it (`switch_call(chunk_id)`, the `chunk_switch` operation). Returns the switch results."""
    files = files or LocalFiles()
    key_path, fingerprint = mirror_config.store_key_path(pool_path, store_url, files)
    key = load_key(key_path, fingerprint) if key_path is not None else None
    source = LogSource(pool_path, fields, files)
    results = []
    try:
        table = source.chunks
        newest = max(table.ids(), default=0)
        for chunk_id in chunk_ids:
            chunk = table.get(chunk_id)
            if chunk.remote is None:
                why = refusal(pool_path, chunk_id, store_url, newest, newest, files)
                if why is not None:
                    raise UsageError(why)
                path = os.path.join(os.path.dirname(chunk.path), manifest_name(chunk_id))
                if not _manifest_fits(path, chunk, store_url, fields["node_id"], key, files):
                    upload(table.pool_uuid, fields["node_id"], chunk, store_url, files, progress, key)
            results.append(switch_call(chunk_id))
    finally:
        source.close()
    return results


def _manifest_fits(path, chunk, store_url, node_id, key, files):
    """An upload done before (the switch was refused or interrupted) need not be done again."""
    if not os.path.exists(path):
        return False
    try:
        manifest = evicted.decode(files.read_file(path), path)
    except (OSError, ValueError, ChunkvolError):  # a bad leftover: upload it again
        return False
    return (manifest.size_bytes == chunk.size_bytes and manifest.store_url == store_url
            and manifest.node_id == node_id and manifest.key_fingerprint == (key and key.fingerprint))


def apply_policy(pool_path, fields, switch_call, files=None):
    """The policy's rule (`chunk policy`), if there is one; returns the switch results."""
    policy = load_policy(pool_path, files)
    if policy is None:
        return []
    return evict_under(pool_path, fields, policy["keep_under"], policy.get("mirror"), switch_call, files)


def evict_under(pool_path, fields, keep_under, mirror_name, switch_call, files=None, progress=None):
    """Evict the oldest eligible chunks while local chunk bytes exceed `keep_under`."""
    store_url = choose_store(pool_path, mirror_name, files)
    source = LogSource(pool_path, fields, files or LocalFiles())
    try:
        chunks = dict(source.chunks.chunks)
        excess = local_bytes(chunks) - keep_under
        newest = max(chunks, default=0)
        chosen = []
        for chunk in candidates(pool_path, chunks, newest, newest, store_url, files):
            if excess <= 0:
                break
            chosen.append(chunk.chunk_id)
            excess -= chunk.size_bytes
    finally:
        source.close()
    return evict(pool_path, fields, chosen, store_url, switch_call, files, progress) if chosen else []
