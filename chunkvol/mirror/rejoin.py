"""A lost source comes back after its mirror was promoted: it rejoins as a mirror of the
promoted node, without a full copy, as DRBD's old primary does after a failover.

What the two share is this node's log up to the last record the promoted node received from
it (its `have` for this node, a flush point). Whatever this node wrote after that never
reached the other side: it is saved whole to POOL/divergent-<time>.cvlog (the raw records, for
forensics or `inspect`), then cut from the log, the block map is rebuilt from what is left,
and the pool becomes a mirror of the promoted node, which then ships its own records here
(`mirror add` on it). Refused when compaction ran after the cut point (its copies would be
cut too): that needs a full copy.
"""

import os
import shutil
import time

from chunkvol.errors import UsageError
from chunkvol.format import chunk_header, pool_metadata
from chunkvol.format.chunk_header import split_address
from chunkvol.format.record import FLAG_RELOCATED, SHIPPED_TYPES, RecordType
from chunkvol.mirror import targets
from chunkvol.mirror.source import LogSource
from chunkvol.pool import Pool, take_pool_lock
from chunkvol.storage.files import LocalFiles


def promoted_state(target_text, fields, pool_path):
    """(its node id, the greatest of our sequences it holds), asked of the promoted node."""
    parsed = targets.parse_target(target_text)
    if parsed[0] in ("rados", "s3"):
        raise UsageError("an object store is not a node to rejoin: `chunkvol restore --from` rebuilds a pool from it")
    if parsed[0] == "dir":
        with Pool.open(parsed[1], readonly=True) as other:
            if other.pool_uuid.hex() != fields["pool_uuid"]:
                raise UsageError(f"{parsed[1]} holds another pool")
            if other.role == "mirror":
                raise UsageError(f"{parsed[1]} is still a mirror: promote it first")
            return other.node_id, other.origins.get(fields["node_id"], 0)
    link = targets.open_target(target_text, fields, pool_path)
    try:
        return link.peer, link.have(fields["node_id"])
    finally:
        link.close()


def find_cut(pool_path, fields, held):
    """Log address of this node's first record after sequence `held`, or None."""
    source = LogSource(pool_path, fields, LocalFiles())
    try:
        ids = source.chunks.ids()
        if not ids:
            return None
        last = source.chunks.get(ids[-1])
        end = chunk_header.address(ids[-1], last.size_bytes)
        for address, header, _ in source.walk(source.first_address(), end):
            if (header.origin_node == fields["node_id"] and header.origin_sequence > held
                    and header.record_type in SHIPPED_TYPES and not header.flags & FLAG_RELOCATED
                    and header.record_type != RecordType.COMMIT):
                return address
        return None
    finally:
        source.close()


def rejoin(pool_path, target_text):
    """Make this pool a mirror of the promoted node at `target_text`. Returns a report."""
    pool_path = os.path.abspath(pool_path)
    fields = Pool.read_metadata(pool_path)
    if fields.get("role") == "mirror":
        raise UsageError("this pool is already a mirror")
    lock = take_pool_lock(pool_path)  # PoolBusyError while served
    try:
        promoted, held = promoted_state(target_text, fields, pool_path)
        if promoted == fields["node_id"]:
            raise UsageError("that is this node itself")
        cut = find_cut(pool_path, fields, held)
        report = {"promoted_node": promoted, "shared_through_sequence": held, "divergent_bytes": 0,
                  "divergent_file": None}
        if cut is not None:
            _check_no_compaction_after(pool_path, cut)
            report.update(_cut(pool_path, fields, cut))
        shutil.rmtree(os.path.join(pool_path, "index"), ignore_errors=True)  # rebuilt from what is left
        changed = {key: value for key, value in fields.items() if key != "checksum"}
        changed.update(role="mirror", mirror_of=promoted)
        LocalFiles().publish(os.path.join(pool_path, "pool.json"), pool_metadata.encode(changed))
    finally:
        os.close(lock)
    with Pool.open(pool_path) as pool:
        report["damage"] = [str(error) for error in pool.damage]
    return report


def _check_no_compaction_after(pool_path, cut):
    hint = os.path.join(pool_path, "base")
    if os.path.exists(hint):
        with open(hint) as handle:
            base = int(handle.read().strip() or 0)
        if base >= cut:
            raise UsageError("this pool was compacted after the point it shares with the promoted node; "
                             "rejoining needs a full copy (make a new mirror from the promoted node)")


def _cut(pool_path, fields, cut):
    """Save the log from `cut` on into one file, then cut it from the chunks."""
    cut_chunk, cut_offset = split_address(cut)
    source = LogSource(pool_path, fields, LocalFiles())
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    saved = os.path.join(pool_path, f"divergent-{stamp}.cvlog")
    total = 0
    try:
        with open(saved, "wb") as out:
            for chunk_id in source.chunks.ids():
                if chunk_id < cut_chunk:
                    continue
                chunk = source.chunks.get(chunk_id)
                start = cut_offset if chunk_id == cut_chunk else chunk_header.DATA_OFFSET
                position = start
                while position < chunk.size_bytes:
                    data = source.chunks.pread(chunk_id, min(8 << 20, chunk.size_bytes - position), position)
                    if not data:
                        break
                    out.write(data)
                    position += len(data)
                    total += len(data)
            out.flush()
            os.fsync(out.fileno())
        paths = {chunk_id: source.chunks.get(chunk_id).path for chunk_id in source.chunks.ids()}
    finally:
        source.close()
    for chunk_id, path in sorted(paths.items()):
        if chunk_id == cut_chunk:
            os.truncate(path, cut_offset)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif chunk_id > cut_chunk:
            os.unlink(path)
    for directory in {os.path.dirname(path) for path in paths.values()}:
        LocalFiles().fsync_directory(directory)
    return {"divergent_bytes": total, "divergent_file": saved}

