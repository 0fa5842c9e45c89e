"""export-diff / import-diff: move the changes between two points of a volume to another pool
as a stream (format/diff_stream.py), for incremental backups: export the first snapshot whole,
then each later one as the changes since the one before; import them in the same order.
"""

import zstandard

from chunkvol import heal, history
from chunkvol.errors import AlreadyExistsError, ChunkvolError, NotFoundError, UsageError
from chunkvol.format import diff_stream

PIECE = diff_stream.MAX_DATA


def export_diff(pool, to_spec, from_spec, out, progress=lambda count: None):
    """Write the stream that turns `from_spec` (None: an empty volume) into `to_spec`.
    Returns {"entries", "data_bytes", "zero_bytes", "stream_bytes"}."""
    with pool.lock:
        end = history.resolve_point(pool, to_spec)
        start = history.resolve_point(pool, from_spec) if from_spec else None
        if start is not None and start.info is not end.info:
            raise UsageError(f"{from_spec} and {to_spec} are points of different volumes")
        if start is not None and start.stamp > end.stamp:
            raise UsageError(f"{from_spec} is later than {to_spec}")
        view = pool.volume(to_spec, heal=heal.heal_read)  # an export reads what a mirror can mend
        if start is not None:
            changes = history.diff(pool, from_spec, to_spec)
        else:
            changes = [(offset, length, True) for offset, length, kind in _all_extents(view) if kind == 0]
    description = {"volume": end.info.name, "size": end.size_bytes, "pool_uuid": pool.pool_uuid.hex(),
                   "from": start.snapshot if start else None, "to": end.snapshot,
                   "from_stamp": start.stamp if start else 0, "to_stamp": end.stamp}
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=True)
    written = out.write(diff_stream.encode_header(description)) or 0
    stats = {"entries": 0, "data_bytes": 0, "zero_bytes": 0}
    buffer = bytearray(PIECE)
    for offset, length, is_data in changes:
        if not is_data:
            written += out.write(diff_stream.encode_entry(diff_stream.ZERO, offset, length)) or 0
            stats["entries"] += 1
            stats["zero_bytes"] += length
            progress(length)
            continue
        position = offset
        while position < offset + length:
            piece = min(PIECE, offset + length - position)
            data = memoryview(buffer)[:piece]
            view.read(data, position)
            packed = compressor.compress(data)
            if len(packed) + 4096 < piece:
                entry = diff_stream.encode_entry(diff_stream.DATA, position, piece, packed, diff_stream.FLAG_ZSTD)
            else:
                entry = diff_stream.encode_entry(diff_stream.DATA, position, piece, bytes(data))
            written += out.write(entry) or 0
            stats["entries"] += 1
            stats["data_bytes"] += piece
            progress(piece)
            position += piece
    written += out.write(diff_stream.encode_entry(diff_stream.END, stats["entries"], 0)) or 0
    out.flush()
    stats["stream_bytes"] = written
    return stats


def _all_extents(view):
    offset = 0
    while offset < view.size_bytes:
        found = view.extents(offset, view.size_bytes - offset)
        if not found:
            break
        yield from found
        offset = found[-1][0] + found[-1][1]


def import_diff(pool, stream, volume_name, progress=lambda count: None, name="diff stream"):
    """Apply a stream to a volume of this pool. A full stream (no `from`) creates the volume; an
    incremental one needs the volume to hold its `from` snapshot, unchanged since. The `to`
    snapshot is created at the end. A stream that is damaged or cut short is undone."""
    reader = diff_stream.Reader(stream, name)
    description = reader.header()
    source_from, source_to = description.get("from"), description.get("to")
    with pool.lock:
        if source_from is None:
            if volume_name in pool.volumes:
                raise AlreadyExistsError(f"volume {volume_name!r} exists; a full stream (no --from-snap) "
                                         "is imported into a new volume")
            compression = "none"
            info = pool.create_volume(volume_name, description["size"], compression)
        else:
            info = pool.volume_info(volume_name)
            if source_from not in pool.snapshots.get(info.volume_id, {}):
                raise NotFoundError(f"volume {volume_name!r} has no snapshot {source_from!r}, the stream's "
                                    "starting point: import the earlier streams first")
            if history.diff(pool, f"{volume_name}@{source_from}"):
                raise UsageError(f"volume {volume_name!r} changed since snapshot {source_from!r}; "
                                 f"roll back to it first (chunkvol snapshot rollback {volume_name}@{source_from})")
            if description["size"] > info.size_bytes:
                pool.resize_volume(volume_name, description["size"])
        if source_to is not None:
            history.validate_snapshot_name(source_to)
            if source_to in pool.snapshots.get(info.volume_id, {}):
                raise AlreadyExistsError(f"volume {volume_name!r} already has a snapshot {source_to!r}")
        before = pool.flush_point()
    volume = pool.volume(volume_name, heal=heal.heal_read)
    stats = {"entries": 0, "data_bytes": 0, "zero_bytes": 0}
    try:
        for tag, offset, length, data in reader.entries_of():
            if tag == diff_stream.DATA:
                volume.write(data, offset)
                stats["data_bytes"] += length
            else:
                volume.zero(offset, length)
                stats["zero_bytes"] += length
            stats["entries"] += 1
            progress(length)
        volume.flush()
    except (ChunkvolError, OSError):
        if source_from is None:
            pool.remove_volume(volume_name)  # it was created for this stream
        else:
            history.rollback_to_stamp(pool, info, before, f"{volume_name} before a failed import")
        raise
    if source_to is not None:
        history.create_snapshot(pool, volume_name, source_to)
    stats["snapshot"] = f"{volume_name}@{source_to}" if source_to else None
    return stats
