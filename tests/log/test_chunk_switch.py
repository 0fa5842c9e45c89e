"""The log crosses chunk boundaries: sealed chunks, crash after the switch, map rebuild."""

import os
import random
import shutil

import pytest

from chunkvol.pool import Pool
from tests.support.faults import abandon


def _fill(volume, rng, model, count):
    for _ in range(count):
        offset = rng.randrange(0, volume.size_bytes - (1 << 20)) // 512 * 512
        data = rng.randbytes(rng.choice([4096, 65536, 1 << 20, 1000]))
        volume.write(data, offset)
        model[offset:offset + len(data)] = data


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_log_spans_many_chunks_and_survives_crash_and_rebuild(tmp_path, cache):
    """With cache=none on a real disk: O_DIRECT appends, sub-page records (1000-byte writes),
    sealed chunks padded to a page, reopened mid-page."""
    path = str(tmp_path / "pool")
    Pool.create(path, chunk_size=16 << 20, cache=cache)
    rng = random.Random(7)
    model = bytearray(64 << 20)
    with Pool.open(path) as pool:
        pool.create_volume("disk0", 64 << 20)
    pool = Pool.open(path)
    assert (pool.writer.direct_fd is not None) == (cache == "none") or not pool.chunks.ids()
    volume = pool.volume("disk0")
    _fill(volume, rng, model, 100)
    pool.flush()
    abandon(pool)
    pool = Pool.open(path)  # appends again from the middle of a page
    volume = pool.volume("disk0")
    _fill(volume, rng, model, 100)
    pool.flush()
    assert len(pool.chunks.ids()) >= 3, "the workload should have filled several chunks"
    if cache == "none":
        assert pool.writer.direct_fd is not None
    abandon(pool)

    pool = Pool.open(path)
    buffer = bytearray(64 << 20)
    pool.volume("disk0").read(buffer, 0)
    assert buffer == model
    assert pool.damage == []
    assert pool.recovery.cut_address == 0, "a zero-padded last page is not a torn write"
    pool.close()
    with Pool.open(path) as reopened:  # a clean stop leaves nothing to cut or replay
        assert reopened.recovery.records_applied == 0 and reopened.recovery.cut_address == 0

    shutil.rmtree(os.path.join(path, "index"))
    with Pool.open(path) as pool:
        buffer = bytearray(64 << 20)
        pool.volume("disk0").read(buffer, 0)
        assert buffer == model
