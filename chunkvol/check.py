"""Checking a pool: every record of the log, and the block map against the log.

1. Walk every chunk from its first record to its end, checking every record's header and
   payload checksum; at a bad record, say which chunk and offset, resynchronise on the next
   valid header and go on (the walk never stops at the first problem: log/scan.py).
2. Rebuild a block map from the log alone into a scratch directory, with the same recovery
   code that opening a pool uses.
3. Compare the pool's block map with the rebuilt one: volume table, then the newest version
   of every written group of every volume.
Repair (`--repair`) replaces POOL/index with a map rebuilt from the log; damage inside the log
itself needs a mirror (a later feature) and is only reported.
"""

import os
import shutil
import tempfile
import time

from chunkvol.format import group_map
from chunkvol.format.record import GROUP_BLOCKS
from chunkvol.log.scan import scan_log
from chunkvol.pool import Pool, take_pool_lock
from chunkvol.space import live_groups


def compare_maps(current, rebuilt):
    """Step 3: a list of differences between two opened pools' block maps."""
    differences = []
    names = set(current.volumes) | set(rebuilt.volumes)
    for name in sorted(names):
        mine, theirs = current.volumes.get(name), rebuilt.volumes.get(name)
        if mine is None or theirs is None:
            differences.append(f"volume {name!r} is {'missing from' if mine is None else 'only in'} the block map")
            continue
        if (mine.volume_id, mine.size_bytes) != (theirs.volume_id, theirs.size_bytes):
            differences.append(f"volume {name!r}: block map says id {mine.volume_id} size {mine.size_bytes}, "
                               f"log says id {theirs.volume_id} size {theirs.size_bytes}")
            continue
        expected = dict(live_groups(rebuilt, theirs.volume_id))
        for group, state in live_groups(current, mine.volume_id):
            want = expected.pop(group, None)
            if _blocks(state) != _blocks(want):
                differences.append(f"volume {name!r} group {group} (bytes {group * 65536}..): "
                                   "block map differs from the log")
        for group, state in expected.items():
            if _blocks(state) != _blocks(None):
                differences.append(f"volume {name!r} group {group}: written in the log, missing from the block map")
    return differences


def _blocks(state):
    """A group's content identity: per block, (record address, block in record) or None."""
    if state is None:
        return (None,) * GROUP_BLOCKS
    slots, refs = state
    addresses = [address for address, _, _, _ in refs]
    return tuple(None if slot == group_map.HOLE else (addresses[slot >> 4], slot & 0x0F) for slot in slots)


def check_pool(path, busy, progress=None):
    """Run steps 1-3; returns a report dict."""
    started = time.monotonic()
    if not busy:
        Pool.open(path).close()  # cut a torn tail and checkpoint, as any open does
    scratch = tempfile.mkdtemp(prefix="chunkvol-check-")  # not on the pool's disk: it may be full
    try:
        with Pool.open(path, readonly=True) as current:
            log_problems, records, scanned = scan_log(current.chunks, progress, tail_may_be_unfinished=current.readonly)
            with Pool.open(path, readonly=True, index_path=scratch) as rebuilt:
                differences = compare_maps(current, rebuilt)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"records": records, "log_bytes": scanned,
            "log_damage": [{"file": f, "offset": o, "error": e} for f, o, e in log_problems],
            "map_differences": differences, "seconds": round(time.monotonic() - started, 3)}


def rebuild_index(path):
    """Replace POOL/index by a block map rebuilt from the log (the pool must not be in use)."""
    lock_fd = take_pool_lock(path)
    index = os.path.join(path, "index")
    aside = f"{index}.replaced-{int(time.time())}"
    try:
        if os.path.exists(index):
            os.rename(index, aside)
    finally:
        os.close(lock_fd)
    Pool.open(path).close()
    shutil.rmtree(aside, ignore_errors=True)
