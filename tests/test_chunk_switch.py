"""The log crosses chunk boundaries: sealed chunks, crash after the switch, map rebuild."""

import os
import random
import shutil

from chunkvol.pool import Pool
from tests.test_model import _crash


def _fill(volume, rng, model, count):
    for _ in range(count):
        offset = rng.randrange(0, volume.size_bytes - (1 << 20)) // 512 * 512
        data = rng.randbytes(rng.choice([4096, 65536, 1 << 20, 1000]))
        volume.write(data, offset)
        model[offset:offset + len(data)] = data


def test_log_spans_many_chunks_and_survives_crash_and_rebuild(tmp_path):
    path = str(tmp_path / "pool")
    Pool.create(path, chunk_size=16 << 20)
    rng = random.Random(7)
    model = bytearray(64 << 20)
    with Pool.open(path) as pool:
        pool.create_volume("disk0", 64 << 20)
    pool = Pool.open(path)
    volume = pool.volume("disk0")
    _fill(volume, rng, model, 200)
    pool.flush()
    assert len(pool.chunks.ids()) >= 3, "the workload should have filled several chunks"
    _crash(pool)

    pool = Pool.open(path)
    buffer = bytearray(64 << 20)
    pool.volume("disk0").read(buffer, 0)
    assert buffer == model
    assert pool.damage == []
    pool.close()

    shutil.rmtree(os.path.join(path, "index"))
    with Pool.open(path) as pool:
        buffer = bytearray(64 << 20)
        pool.volume("disk0").read(buffer, 0)
        assert buffer == model
