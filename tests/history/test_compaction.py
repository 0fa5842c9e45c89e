"""Compaction: frees mostly-dead chunks, keeps every byte any point needs, survives kill -9 at
every step, and leaves a log the block map can be rebuilt from (through the base).

The kill tests run compaction in a child process that SIGKILLs itself at a chosen moment (a
wrapper around one of compaction's steps, in the child only), then check the pool from here:
the live volume and every snapshot read back exactly, before and after a rebuild of the map.
"""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from chunkvol import compaction, history
from chunkvol.errors import FormatError
from chunkvol.format import base as base_format
from chunkvol.log import base
from chunkvol.pool import Pool
from tests.support.paths import ROOT
from tests.support.server import chunkvol

MiB = 1 << 20
VOLUME_BYTES = 8 * MiB


def _fill(path, seed=7):
    """A pool with dead records in its early chunks, a snapshot holding some of them, and a
    clone of it: returns {point: sha256} of everything that must survive."""
    Pool.create(path, chunk_size=16 * MiB)
    rng = random.Random(seed)
    with Pool.open(path) as pool:
        pool.create_volume("v", VOLUME_BYTES)
        volume = pool.volume("v")
        for round_number in range(10):
            for _ in range(200):
                block = rng.randrange(VOLUME_BYTES // 4096 - 8)
                volume.write(bytes([rng.randrange(1, 256)]) * 4096 * rng.randint(1, 8), block * 4096)
            volume.zero(rng.randrange(64) * 65536, 65536)
            volume.flush()
            if round_number == 4:
                history.create_snapshot(pool, "v", "mid")
        history.clone(pool, "v@mid", "c")
        pool.volume("c").write(b"clone!" * 700 + bytes(4096 - 4200 % 4096), 12288)
        pool.volume("c").flush()
        history.prune(pool, "v", 0)
        return _digests(pool)


def _digests(pool):
    result = {}
    for point in ("v", "v@mid", "c"):
        view = pool.volume(point)
        buffer = bytearray(view.size_bytes)
        view.read(buffer, 0)
        result[point] = hashlib.sha256(buffer).hexdigest()
    return result


def _check(path, expected):
    with Pool.open(path) as pool:
        assert not pool.damage, pool.damage
        assert _digests(pool) == expected
    shutil.rmtree(os.path.join(path, "index"))
    with Pool.open(path) as pool:
        assert not pool.damage, pool.damage
        assert _digests(pool) == expected


def test_compaction_frees_dead_chunks_and_keeps_every_point(tmp_path):
    path = str(tmp_path / "pool")
    expected = _fill(path)
    with Pool.open(path) as pool:
        before = sum(pool.chunks.get(c).size_bytes for c in pool.chunks.ids())
        usage = compaction.chunk_usage(pool, (pool.checkpoint(), compaction.live_records(pool))[1])
        report = compaction.compact(pool, min_dead=0.3)
        after = sum(pool.chunks.get(c).size_bytes for c in pool.chunks.ids())
        assert report["victims"] and set(report["victims"]).isdisjoint(pool.chunks.ids())
        assert all(1 - usage[c][1] / usage[c][0] >= 0.3 for c in report["victims"])
        assert report["freed_bytes"] > report["copied_bytes"]
        # The log lost the victims and gained the copies plus a small base.
        expected_after = before - report["freed_bytes"] + report["copied_bytes"]
        assert expected_after <= after <= expected_after + MiB
        assert _digests(pool) == expected
        # Nothing left to do at the same threshold: the copies are live, the rest is young.
        assert compaction.compact(pool, min_dead=0.99)["victims"] == []
    _check(path, expected)
    # Without the hint the base is found by scanning the log.
    os.remove(os.path.join(path, compaction.HINT_NAME))
    _check(path, expected)


def test_compaction_twice_and_writes_between(tmp_path):
    path = str(tmp_path / "pool")
    _fill(path)
    rng = random.Random(3)
    with Pool.open(path) as pool:
        compaction.compact(pool, min_dead=0.3)
        volume = pool.volume("v")
        for _ in range(3):
            for _ in range(1200):
                volume.write(bytes([rng.randrange(256)]) * 8192, rng.randrange(VOLUME_BYTES // 8192) * 8192)
            volume.flush()
        history.create_snapshot(pool, "v", "late")
        history.prune(pool, "v", 0)
        second = compaction.compact(pool, min_dead=0.3)
        assert second["victims"]
        expected = _digests(pool)
        late = pool.volume("v@late")
        buffer = bytearray(VOLUME_BYTES)
        late.read(buffer, 0)
        late_digest = hashlib.sha256(buffer).hexdigest()
    _check(path, expected)
    with Pool.open(path) as pool:
        buffer = bytearray(VOLUME_BYTES)
        pool.volume("v@late").read(buffer, 0)
        assert hashlib.sha256(buffer).hexdigest() == late_digest


# Where the child kills itself: (module, object in it, function to wrap, calls before the kill).
KILL_POINTS = {
    "copying": ("chunkvol.compaction", None, "_copy_one", 40),
    "before-remap": ("chunkvol.compaction", None, "point_map_at_copies", 0),
    "before-base-end": ("chunkvol.compaction", None, "_append_summary", 1),  # fragments written
    "before-hint": ("chunkvol.storage.files", "LocalFiles", "publish", 0),  # base synced
    "deleting-victims": ("chunkvol.storage.chunks", "ChunkTable", "remove", 1),
}


@pytest.mark.parametrize("moment", sorted(KILL_POINTS))
def test_kill_9_anywhere_in_compaction_loses_nothing(tmp_path, moment):
    path = str(tmp_path / "pool")
    expected = _fill(path)
    module, owner, function, calls = KILL_POINTS[moment]
    child = textwrap.dedent(f"""
        import importlib, os, signal, sys
        sys.path.insert(0, {ROOT!r})
        from chunkvol import compaction
        from chunkvol.pool import Pool
        target = importlib.import_module({module!r})
        if {owner!r}:
            target = getattr(target, {owner!r})
        original = getattr(target, {function!r})
        seen = [0]
        def wrapper(*args, **kwargs):
            if seen[0] >= {calls}:
                os.kill(os.getpid(), signal.SIGKILL)
            seen[0] += 1
            return original(*args, **kwargs)
        setattr(target, {function!r}, wrapper)
        pool = Pool.open({path!r})
        compaction.compact(pool, min_dead=0.3)
        print("finished without reaching the kill point")
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, (result.stdout, result.stderr)
    _check(path, expected)
    # And compaction still works afterwards (the half-done one is garbage for this one).
    with Pool.open(path) as pool:
        compaction.compact(pool, min_dead=0.3)
        assert _digests(pool) == expected
    _check(path, expected)


def test_damaged_live_record_keeps_its_chunk(tmp_path):
    """A victim holding a live record that fails its checksum is left alone (never copied as
    good data); the other victims are still freed."""
    path = str(tmp_path / "pool")
    _fill(path)
    with Pool.open(path) as pool:
        pool.checkpoint()
        live = compaction.live_records(pool)
        usage = compaction.chunk_usage(pool, live)
        candidates = [c for c, (w, l) in usage.items() if w and 1 - l / w >= 0.3 and c < max(usage)]
        victim = candidates[0]
        address = min(a for a in live if a >> 40 == victim)
        chunk_path = pool.chunks.get(victim).path
    offset = (address & ((1 << 40) - 1)) + 72 + 200
    with open(chunk_path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with Pool.open(path) as pool:
        report = compaction.compact(pool, min_dead=0.3)
        assert victim in [s["chunk"] for s in report["skipped"]]
        assert victim in pool.chunks.ids()
        assert "checksum" in report["skipped"][0]["reason"]


def test_compact_cli_on_a_served_pool_while_a_client_writes(tmp_path, server_factory):
    path = str(tmp_path / "pool")
    chunkvol("--pool", path, "init", "--chunk-size", "16M")
    chunkvol("--pool", path, "volume", "create", "v", "--size", "8M")
    server = server_factory(path)
    handle = server.connect("v")
    rng = random.Random(11)
    model = bytearray(VOLUME_BYTES)
    for _ in range(10):  # > 16 MiB of log: chunk 1 is sealed, and mostly overwritten
        for _ in range(500):
            offset = rng.randrange(VOLUME_BYTES // 4096) * 4096
            data = bytes([rng.randrange(256)]) * 4096
            handle.pwrite(data, offset)
            model[offset:offset + 4096] = data
        handle.flush()
    chunkvol("--pool", path, "snapshot", "create", "v@s")
    snapshot = bytes(model)
    chunkvol("--pool", path, "prune", "v", "--keep", "0s")
    compactor = subprocess.Popen([os.path.join(ROOT, ".venv", "bin", "chunkvol"), "--pool", path, "compact",
                                  "--min-dead", "0.3", "--json"], stdout=subprocess.PIPE, text=True)
    while compactor.poll() is None:  # the client goes on writing while compaction runs
        offset = rng.randrange(VOLUME_BYTES // 4096) * 4096
        data = bytes([rng.randrange(256)]) * 4096
        handle.pwrite(data, offset)
        model[offset:offset + 4096] = data
    output = compactor.stdout.read()
    assert compactor.returncode == 0, output
    assert '"victims": [' in output and '"victims": []' not in output
    handle.flush()
    assert handle.pread(VOLUME_BYTES, 0) == model
    assert server.connect("v@s").pread(VOLUME_BYTES, 0) == snapshot
    server.kill()
    shutil.rmtree(os.path.join(path, "index"))
    server = server_factory(path)
    assert server.connect("v").pread(VOLUME_BYTES, 0) == model
    assert server.connect("v@s").pread(VOLUME_BYTES, 0) == snapshot


@pytest.mark.parametrize("moment", ["before-prune-record", "in-prune-checkpoint"])
def test_kill_9_during_prune_loses_nothing(tmp_path, moment):
    """Prune is a PRUNE record, then a checkpoint that drops the versions: dying between the
    two, or inside the LMDB transaction, leaves every snapshot and the live volume intact."""
    path = str(tmp_path / "pool")
    expected = _fill(path)
    with Pool.open(path) as pool:  # more history to release
        volume = pool.volume("v")
        for number in range(50):
            volume.write(bytes([number]) * 4096, number * 4096)
            volume.flush()
        expected = _digests(pool)
    target, function = (("chunkvol.history", "_log") if moment == "before-prune-record"
                        else ("chunkvol.index.blockmap", "BlockMap._prune_groups"))
    child = textwrap.dedent(f"""
        import importlib, os, signal, sys
        sys.path.insert(0, {ROOT!r})
        from chunkvol import history
        from chunkvol.pool import Pool
        owner = importlib.import_module({target!r})
        name = {function!r}
        if "." in name:
            owner, name = getattr(owner, name.split(".")[0]), name.split(".")[1]
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(owner, name, die)
        pool = Pool.open({path!r})
        history.prune(pool, "v", 0)
        print("prune finished without reaching the kill point")
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, (result.stdout, result.stderr)
    _check(path, expected)
    with Pool.open(path) as pool:
        history.prune(pool, "v", 0)
        assert _digests(pool) == expected
    _check(path, expected)


def test_a_map_too_large_for_one_base_end_is_listed_through_index_fragments(tmp_path, monkeypatch):
    """Issue 14, item 7: a base had at most 8192 fragments (some 6.6 million group versions);
    above that, compaction failed after writing them. Now one level of index fragments lists
    them (about 3.7 TB of map). Shown here with small fragments and limits: the base is written,
    found, and a rebuild from it (chunk 1 freed) reads every point as before."""
    monkeypatch.setattr(base_format, "FRAGMENT_BYTES", 1024)
    monkeypatch.setattr(base_format, "MAX_FRAGMENTS", 6)
    monkeypatch.setattr(base_format, "INDEX_ADDRESSES", 50)
    path = str(tmp_path / "pool")
    expected = _fill(path)
    with Pool.open(path) as pool:
        assert compaction.compact(pool, min_dead=0.3)["victims"]
        checkpoint, data_fragments = base.find_base(pool.chunks, pool.path, pool.pool_uuid)
        assert len(data_fragments) > base_format.MAX_FRAGMENTS * 2, len(data_fragments)
    _check(path, expected)
    os.remove(os.path.join(path, compaction.HINT_NAME))
    _check(path, expected)


def test_base_index_fragments_round_trip_and_unknown_levels_are_refused():
    addresses = [random.Random(1).randrange(1 << 63) for _ in range(3 * base_format.INDEX_ADDRESSES + 7)]
    payloads = list(base_format.index_fragments(0x1234, addresses))
    assert len(payloads) == 4 and all(len(p) <= base_format.FRAGMENT_BYTES for p in payloads)
    listed = []
    for index, payload in enumerate(payloads):
        listed += base_format.decode_index_fragment(payload, 0x1234, index)
    assert listed == addresses
    with pytest.raises(FormatError):
        base_format.decode_index_fragment(payloads[1], 0x1234, 0)  # out of place
    end = bytearray(base_format.encode_end(bytes(80), [1, 2], levels=1))
    assert base_format.decode_end(bytes(end))[1:] == ([1, 2], 1)
    end[84] = 2
    with pytest.raises(FormatError, match="levels"):
        base_format.decode_end(bytes(end))
    assert base_format.MAX_FRAGMENTS * base_format.INDEX_ADDRESSES * base_format.FRAGMENT_BYTES > 3 << 40
