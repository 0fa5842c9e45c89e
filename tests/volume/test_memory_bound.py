"""A client that never flushes cannot grow the server's memory: the block map's unsaved
versions stay under CHECKPOINT_GROUPS (plus one auto flush point's worth), whatever the
volume size (in-process; the bounds are made small so it runs in a second)."""

import os
import random

from chunkvol.pool import Pool, journal

BLOCK = 4096
GROUP = 16 * BLOCK


def test_writes_without_flushes_keep_unsaved_versions_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "CHECKPOINT_GROUPS", 256)
    monkeypatch.setattr(journal, "AUTO_FLUSH_BYTES", 16 * BLOCK)  # a flush point every 16 writes
    path = str(tmp_path / "pool")
    Pool.create(path, chunk_size=16 << 20)
    groups = 4096
    with Pool.open(path) as pool:
        pool.create_volume("big", groups * GROUP, "none")
    rng = random.Random(7)
    order = rng.sample(range(groups), 2000)  # every write in a group of its own: the worst case
    written = {}
    with Pool.open(path) as pool:
        volume = pool.volume("big")
        most = 0
        for group in order:
            data = rng.randbytes(BLOCK)
            volume.write(data, group * GROUP)
            written[group] = data
            most = max(most, pool.blockmap.unsaved)
        assert most <= 256 + 16, f"{most} block-map versions waited in memory for a checkpoint"
    with Pool.open(path) as pool:  # and nothing was lost on the way
        volume = pool.volume("big")
        for group, data in written.items():
            buffer = bytearray(BLOCK)
            volume.read(buffer, group * GROUP)
            assert buffer == data, f"group {group}"
    assert os.path.isdir(os.path.join(path, "index"))
