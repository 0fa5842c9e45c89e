"""Recovery rules (chunkvol/log/recovery.py), one behaviour per test, on hand-damaged pools.

Guarantee 3: a torn record at the log tail is cut on recovery; a corrupted record anywhere
else is reported (pool.damage after Pool.open) and reads of it fail (CorruptionError
in-process, EIO over NBD), never returned as data. Plus: the block map is a cache (deleting
it rebuilds the same volume), a clean close leaves nothing to replay, an interrupted chunk
creation leaves nothing behind, and a full disk loses nothing flushed.
"""

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess

import nbd
import pytest

from chunkvol.errors import AlreadyExistsError, CorruptionError, FormatError, NotFoundError, OutOfSpaceError
from chunkvol.format import chunk_dir_label, chunk_header
from chunkvol.index.blockmap import BlockMap
from chunkvol.pool import Pool
from chunkvol.storage.chunks import chunk_name
from tests.support.faults import Fault, FaultyFiles, PowerLoss, abandon, make_pool, scratch, track_index  # noqa: F401
from tests.support.paths import ROOT
from tests.support.server import chunkvol

MiB = 1 << 20
VOLUME = 64 * MiB


def _chunk_path(pool_path, chunk_id):
    return os.path.join(pool_path, "chunks", chunk_name(chunk_id))


def _split(log_address):
    return chunk_header.split_address(log_address)


def _read(pool, offset, length, name="disk0"):
    buffer = bytearray(length)
    pool.volume(name).read(buffer, offset)
    return bytes(buffer)


def _volume_hash(pool, name="disk0", step=4 * MiB):
    volume = pool.volume(name)
    digest = hashlib.sha256()
    for offset in range(0, volume.size_bytes, step):
        buffer = bytearray(min(step, volume.size_bytes - offset))
        volume.read(buffer, offset)
        digest.update(buffer)
    return digest.hexdigest()


def _data(seed, length):
    return random.Random(seed).randbytes(length)


# ---- the torn tail ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torn_tail_pool(tmp_path_factory):
    """A pool whose log ends with two unflushed requests B1 (one record) and B2 (two records)
    after a flushed request A; the writer's buffer was drained (the records are in the file)
    and the process died. Returns (path, layout): log addresses of each request's start/end."""
    path = make_pool(str(tmp_path_factory.mktemp("torn") / "pool"), volume_size=VOLUME)
    pool = Pool.open(path)
    volume = pool.volume("disk0")
    volume.write(_data("A", 64 << 10), 0)
    volume.flush()
    layout = {"B1": [pool.writer.position]}
    volume.write(_data("B1", 8 << 10), 1 * MiB)
    layout["B1"].append(pool.writer.position)
    layout["B2"] = [pool.writer.position]
    volume.write(_data("B2", 128 << 10), 2 * MiB)  # two map groups: two records
    layout["B2"].append(pool.writer.position)
    pool.writer.drain()
    abandon(pool)
    return path, layout


def _cut_points(layout):
    b1_start, b1_end = (_split(a)[1] for a in layout["B1"])
    b2_start, b2_end = (_split(a)[1] for a in layout["B2"])
    points = {b1_start + 1, b1_start + 40, b1_start + 71, b1_start + 72, b1_start + 73,
              (b1_start + b1_end) // 2, b1_end - 1, b1_end, b2_start + 1, b2_start + 72,
              b2_start + 4096, (b2_start + b2_end) // 2, b2_end - 72, b2_end - 1, b2_end}
    rng = random.Random(5)
    points.update(rng.randrange(b1_start + 1, b2_end) for _ in range(12))
    points.update(range((b1_start // 512 + 1) * 512, b2_end, 16 * 1024))
    return sorted(points)


def test_truncated_trailing_record_is_cut(torn_tail_pool, scratch):
    """Truncate the chunk anywhere inside the unflushed tail: the open cuts back to the last
    whole request, reports no damage, keeps the flushed data, and shows each tail request
    whole or not at all; the pool then takes writes and reopens cleanly."""
    template, layout = torn_tail_pool
    b1_end = _split(layout["B1"][1])[1]
    b2_end = _split(layout["B2"][1])[1]
    b1_start = _split(layout["B1"][0])[1]
    for point in _cut_points(layout):
        path = os.path.join(scratch, f"cut{point}")
        shutil.copytree(template, path)
        os.truncate(_chunk_path(path, 1), point)
        with Pool.open(path) as pool:
            expected_end = b2_end if point >= b2_end else b1_end if point >= b1_end else b1_start
            assert pool.damage == [], f"cut at {point}: {pool.damage}"
            assert _split(pool.recovery.end_address) == (1, expected_end), f"cut at {point}"
            assert _read(pool, 0, 64 << 10) == _data("A", 64 << 10)
            assert _read(pool, 1 * MiB, 8 << 10) == (_data("B1", 8 << 10) if point >= b1_end else bytes(8 << 10))
            assert _read(pool, 2 * MiB, 128 << 10) == (_data("B2", 128 << 10) if point >= b2_end else bytes(128 << 10))
            pool.volume("disk0").write(_data("C", 4096), 3 * MiB)
            pool.flush()
        with Pool.open(path) as pool:
            assert pool.damage == [] and pool.recovery.records_applied == 0
            assert _read(pool, 3 * MiB, 4096) == _data("C", 4096)
        shutil.rmtree(path)


@pytest.mark.parametrize("garbage", ["random", "zeros", "magic", "header-copy"])
def test_garbage_after_the_last_record_is_cut(garbage, torn_tail_pool, scratch):
    """Bytes after the last whole record that are not a valid record (random, zeros from a
    preallocated/extended file, a record magic with junk, a copy of a real header whose payload
    never came) are a torn tail: cut silently, nothing lost."""
    template, layout = torn_tail_pool
    path = os.path.join(scratch, "pool")
    shutil.copytree(template, path)
    chunk = _chunk_path(path, 1)
    end = os.path.getsize(chunk)
    rng = random.Random(garbage)
    if garbage == "random":
        tail = rng.randbytes(5000)
    elif garbage == "zeros":
        tail = bytes(64 << 10)
    elif garbage == "magic":
        tail = b"CVrc" + rng.randbytes(300)
    else:
        with open(chunk, "rb") as handle:
            handle.seek(_split(layout["B1"][0])[1])
            tail = handle.read(72) + rng.randbytes(100)  # header says more payload than follows
    with open(chunk, "ab") as handle:
        handle.write(tail)
    with Pool.open(path) as pool:
        assert pool.damage == []
        assert _split(pool.recovery.end_address) == (1, end)
        assert _read(pool, 2 * MiB, 128 << 10) == _data("B2", 128 << 10)
        pool.volume("disk0").write(_data("D", 8192), 5 * MiB)
        pool.flush()
    with Pool.open(path) as pool:
        assert pool.damage == []
        assert _read(pool, 5 * MiB, 8192) == _data("D", 8192)
        assert _read(pool, 0, 64 << 10) == _data("A", 64 << 10)


# ---- corruption below the durable point ---------------------------------------------------

def _pool_with_record_before_commit(path, commit_on_disk=True):
    """A (one record at offset 0), then B, then a flush; then C and another flush, which puts
    the first flush's COMMIT (it says "durable past B") on disk. The process dies (the map is
    not checkpointed: A is replayed at open). Returns the chunk offset of A's record."""
    make_pool(path, volume_size=VOLUME)
    pool = Pool.open(path)
    volume = pool.volume("disk0")
    record_a = _split(pool.writer.position)[1]
    volume.write(_data("A", 64 << 10), 0)
    volume.write(_data("B", 64 << 10), 1 * MiB)
    volume.flush()
    if commit_on_disk:
        volume.write(_data("C", 4096), 3 * MiB)
        volume.flush()
    abandon(pool)
    return record_a


def _flip(path, offset):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x5A]))


def _assert_range_fails(pool_path, server_factory, offset, length):
    server = server_factory(pool_path)
    handle = server.connect()
    with pytest.raises(nbd.Error) as failure:
        handle.pread(length, offset)
    assert failure.value.errnum == errno.EIO, failure.value
    assert handle.pread(64 << 10, 1 * MiB) == _data("B", 64 << 10)
    handle.shutdown()
    server.kill()


@pytest.mark.parametrize("where", ["payload", "payload-index-rebuilt"])
def test_corrupted_record_before_a_later_commit_is_reported_not_cut(where, tmp_path, server_factory):
    """A bit flip in a record that a later COMMIT proves durable: the open reports it (with
    file and offset), cuts nothing (later records stay), and reads of its range fail (EIO
    over NBD) while the rest reads fine."""
    path = str(tmp_path / "pool")
    record_a = _pool_with_record_before_commit(path)
    chunk = _chunk_path(path, 1)
    size = os.path.getsize(chunk)
    _flip(chunk, record_a + 72 + 5000)  # a raw record: 16 table entries, then block 1 holds it
    if where == "payload-index-rebuilt":
        shutil.rmtree(os.path.join(path, "index"))
    with Pool.open(path) as pool:
        assert pool.damage, "the corrupted record was not reported"
        assert any(getattr(d, "offset", None) == record_a and chunk in str(d) for d in pool.damage), pool.damage
        assert pool.recovery.cut_address == 0 and os.path.getsize(chunk) >= size, "durable log was cut"
        assert _read(pool, 1 * MiB, 64 << 10) == _data("B", 64 << 10)
        with pytest.raises(CorruptionError):
            _read(pool, 0, 64 << 10)
    _assert_range_fails(path, server_factory, 4096, 4096)


def test_corruption_in_the_last_flushed_window_does_not_silently_cut_flushed_data(tmp_path):
    """A and B written and flushed (acknowledged: durable), then the process dies before any
    later flush; A's record is then damaged (bit rot). B must still read back, or at least the
    loss must be reported; it must not vanish as if it had never been flushed."""
    path = str(tmp_path / "pool")
    record_a = _pool_with_record_before_commit(path, commit_on_disk=False)
    _flip(_chunk_path(path, 1), record_a + 72 + 5000)
    with Pool.open(path) as pool:
        assert _read(pool, 1 * MiB, 64 << 10) == _data("B", 64 << 10) or pool.damage, (
            f"flushed write B was cut without a report (cut at {_split(pool.recovery.cut_address)})")


def test_corrupted_record_below_the_checkpoint_reads_eio(tmp_path, server_factory):
    """The same bit flip after a clean close (the block map already points at the record, the
    open replays nothing): reads of it still fail, they do not return the bad bytes."""
    path = str(tmp_path / "pool")
    make_pool(path, volume_size=VOLUME)
    with Pool.open(path) as pool:
        record_a = _split(pool.writer.position)[1]
        pool.volume("disk0").write(_data("A", 64 << 10), 0)
        pool.volume("disk0").write(_data("B", 64 << 10), 1 * MiB)
    _flip(_chunk_path(path, 1), record_a + 72 + 9000)
    with Pool.open(path) as pool:
        assert pool.recovery.records_applied == 0
        with pytest.raises(CorruptionError):
            _read(pool, 0, 64 << 10)
        assert _read(pool, 1 * MiB, 64 << 10) == _data("B", 64 << 10)
    _assert_range_fails(path, server_factory, 8192, 4096)


@pytest.mark.parametrize("field, at", [("origin_sequence", 28), ("hlc", 36), ("payload_xxh3", 60)])
def test_corrupted_record_header_before_a_later_commit_is_reported_and_its_range_fails(field, at, tmp_path):
    """A bit flip in the header of a durable record in the replayed tail: reported, not cut,
    and its range must not silently read as something else (the write was flushed)."""
    path = str(tmp_path / "pool")
    record_a = _pool_with_record_before_commit(path)
    chunk = _chunk_path(path, 1)
    _flip(chunk, record_a + at)  # the header checksum no longer matches
    with Pool.open(path) as pool:
        assert pool.damage, "the corrupted header was not reported"
        assert pool.recovery.cut_address == 0
        assert _read(pool, 1 * MiB, 64 << 10) == _data("B", 64 << 10)
        try:
            data = _read(pool, 0, 64 << 10)
        except CorruptionError:
            data = None
        assert data is None, ("a flushed write whose record header is corrupted reads back as "
                              f"{'zeros' if data == bytes(len(data)) else 'other data'}, without an error")


def test_corrupted_offset_in_a_record_header_is_reported_by_open_and_check(tmp_path):
    """When the damaged field is the record's own volume offset, nothing on disk says which
    blocks it held (no mirror yet): the damage is reported, with file and offset, at open and
    by `chunkvol check` (exit 6); it is never mapped to a guessed range."""
    path = str(tmp_path / "pool")
    record_a = _pool_with_record_before_commit(path)
    chunk = _chunk_path(path, 1)
    _flip(chunk, record_a + 44)  # inside offset_bytes
    with Pool.open(path) as pool:
        assert any(getattr(d, "offset", None) == record_a and chunk in str(d) for d in pool.damage), pool.damage
        assert pool.recovery.cut_address == 0
        assert _read(pool, 1 * MiB, 64 << 10) == _data("B", 64 << 10)
        assert len(pool.volumes_by_id) == 1 and not any(
            group >= VOLUME // (64 << 10) for _, group in pool.blockmap.overlay), "mapped to a guessed range"
    result = chunkvol("--pool", path, "check", "--json", check=False)
    assert result.returncode == 6
    assert json.loads(result.stdout)["log_damage"][0]["offset"] == record_a


def _two_chunk_pool(path):
    """A pool whose log fills chunk 1, seals it and goes on in chunk 2; cleanly closed."""
    make_pool(path, volume_size=VOLUME)
    with Pool.open(path) as pool:
        volume = pool.volume("disk0")
        for step in range(20):
            volume.write(_data(f"fill{step}", 1 * MiB), step * MiB)
        assert pool.chunks.ids() == [1, 2]
        return _volume_hash(pool)


def _three_chunk_pool(path, chunk_dirs=None):
    """A pool whose log runs through chunks 1, 2 and 3, every write flushed; cleanly closed."""
    make_pool(path, volume_size=VOLUME, chunk_dirs=chunk_dirs)
    with Pool.open(path) as pool:
        volume = pool.volume("disk0")
        for step in range(40):
            volume.write(_data(f"fill{step}", 1 * MiB), step * MiB)
            volume.flush()
        assert pool.chunks.ids() == [1, 2, 3]
        return _volume_hash(pool)


def _file_digests(directory):
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory))}


def test_a_chunk_missing_in_the_middle_of_the_log_refuses_the_open(tmp_path):
    """Chunk 2 of 1..3 is gone (moved away) and the map is rebuilt from the log: the open is
    refused, naming chunk 2 and where it was expected, and changes nothing; with the file
    back, the pool opens and every flushed byte is there. (Before: replay stopped at the hole,
    chunk 3's records left the map and the writer re-created chunk 2.)"""
    path = str(tmp_path / "pool")
    before = _three_chunk_pool(path)
    shutil.rmtree(os.path.join(path, "index"))  # replay from chunk 1
    away = str(tmp_path / "away")
    os.rename(_chunk_path(path, 2), away)
    files_before = _file_digests(os.path.join(path, "chunks"))
    with pytest.raises(NotFoundError) as refused:
        Pool.open(path)
    message = str(refused.value)
    assert "chunk 2 " in message and chunk_name(2) in message and os.path.join(path, "chunks") in message
    assert _file_digests(os.path.join(path, "chunks")) == files_before
    os.rename(away, _chunk_path(path, 2))
    with Pool.open(path) as pool:
        assert pool.damage == [] and pool.chunks.ids() == [1, 2, 3]
        assert _volume_hash(pool) == before


def test_the_chunk_of_the_checkpoint_missing_refuses_the_open(tmp_path):
    """The checkpoint points into chunk 3, whose file is gone and no later chunk exists: the
    open is refused (before: the writer started chunk 3 anew, losing what the map named there)."""
    path = str(tmp_path / "pool")
    before = _three_chunk_pool(path)
    away = str(tmp_path / "away")
    os.rename(_chunk_path(path, 3), away)
    with pytest.raises(NotFoundError, match="chunk 3 "):
        Pool.open(path)
    assert not os.path.exists(_chunk_path(path, 3))
    os.rename(away, _chunk_path(path, 3))
    with Pool.open(path) as pool:
        assert _volume_hash(pool) == before


def test_a_chunk_directory_whose_disk_is_not_mounted_refuses_the_open(tmp_path):
    """A pool over two chunk directories; the second one's disk is not mounted at the next open
    (its mount point an empty directory): the open is refused naming that directory, nothing
    is written into it; the disk comes back and every flushed byte is there."""
    path = str(tmp_path / "pool")
    before = _three_chunk_pool(path, chunk_dirs=["disk-a", "disk-b"])
    disk_a, disk_b = os.path.join(path, "disk-a"), os.path.join(path, "disk-b")
    for chunk_id in (2, 3):  # where the allocator could have put them, on a fuller first disk
        os.rename(os.path.join(disk_a, chunk_name(chunk_id)), os.path.join(disk_b, chunk_name(chunk_id)))
    unmounted = str(tmp_path / "disk-b-unmounted")
    os.rename(disk_b, unmounted)
    os.mkdir(disk_b)  # the empty mount point
    for index in (False, True):  # with the block map, and rebuilding it from the log
        if index:
            shutil.rmtree(os.path.join(path, "index"))
        with pytest.raises(NotFoundError, match="disk-b is empty"):
            Pool.open(path)
        assert os.listdir(disk_b) == []
    os.rmdir(disk_b)
    os.rename(unmounted, disk_b)
    with Pool.open(path) as pool:
        assert pool.damage == [] and pool.chunks.ids() == [1, 2, 3]
        assert _volume_hash(pool) == before


def test_a_pool_from_before_directory_labels_is_labelled_at_open(tmp_path):
    """Pools made before chunk directory labels have none: a writable open labels every
    directory, and a later open with one of them empty is refused."""
    path = str(tmp_path / "pool")
    before = _three_chunk_pool(path, chunk_dirs=["disk-a", "disk-b"])
    for directory in ("disk-a", "disk-b"):
        os.remove(os.path.join(path, directory, chunk_dir_label.NAME))
    with Pool.open(path) as pool:
        assert _volume_hash(pool) == before
    for directory in ("disk-a", "disk-b"):
        assert os.path.exists(os.path.join(path, directory, chunk_dir_label.NAME))


def test_a_chunk_directory_of_another_pool_is_refused(tmp_path):
    path, other = str(tmp_path / "pool"), str(tmp_path / "other")
    make_pool(path, volume_size=VOLUME)
    make_pool(other, volume_size=VOLUME)
    shutil.copy(os.path.join(other, "chunks", chunk_dir_label.NAME), os.path.join(path, "chunks"))
    with pytest.raises(FormatError, match="another pool"):
        Pool.open(path)


def test_a_new_chunk_never_replaces_an_existing_file(tmp_path):
    """The writer's next chunk id already has a file (one that recovery could not see): the
    chunk is not created over it, the write fails with a clear error, the file is untouched."""
    path = str(tmp_path / "pool")
    _two_chunk_pool(path)
    stray = str(tmp_path / "pool" / "chunks" / chunk_name(3))
    with Pool.open(path) as pool:
        with open(stray, "wb") as handle:
            handle.write(b"a chunk the log must not overwrite")
        with pytest.raises(AlreadyExistsError, match="chunk 3 already exists"):
            for step in range(20):
                pool.volume("disk0").write(_data(f"more{step}", 1 * MiB), (20 + step) * MiB)
        with open(stray, "rb") as handle:
            assert handle.read() == b"a chunk the log must not overwrite"
        os.remove(stray)


def test_corrupted_record_in_a_sealed_chunk_is_reported(tmp_path):
    """Corruption in chunk 1 while chunk 2 exists (a later chunk proves chunk 1 durable):
    reported, not cut; chunk 2 and the rest of chunk 1 stay."""
    path = str(tmp_path / "pool")
    _two_chunk_pool(path)
    shutil.rmtree(os.path.join(path, "index"))  # replay from the start, through chunk 1
    _flip(_chunk_path(path, 1), 3 * MiB + 12345)
    with Pool.open(path) as pool:
        assert pool.damage
        assert pool.recovery.cut_address == 0
        assert pool.chunks.ids() == [1, 2]
        assert _read(pool, 19 * MiB, 1 * MiB) == _data("fill19", 1 * MiB)
        broken = 0
        for step in range(20):
            try:
                assert _read(pool, step * MiB, 1 * MiB) == _data(f"fill{step}", 1 * MiB)
            except CorruptionError:
                broken += 1
        assert broken == 1, f"{broken} MiB regions unreadable, expected exactly the corrupted one"


@pytest.mark.parametrize("index", ["rebuilt", "kept"])
def test_chunk_missing_its_seal_while_later_chunks_exist_is_reported(index, tmp_path):
    """Chunk 1 lost its SEAL record (the last 72 bytes) though chunk 2 exists: reported as
    damage when the walk passes chunk 1; nothing is cut and the volume reads as before."""
    path = str(tmp_path / "pool")
    before = _two_chunk_pool(path)
    chunk = _chunk_path(path, 1)
    os.truncate(chunk, os.path.getsize(chunk) - 72)
    if index == "rebuilt":
        shutil.rmtree(os.path.join(path, "index"))
    with Pool.open(path) as pool:
        if index == "rebuilt":
            assert any("SEAL" in str(d) for d in pool.damage), pool.damage
        assert pool.chunks.ids() == [1, 2]
        assert _volume_hash(pool) == before


# ---- the block map is a cache -----------------------------------------------------------------

def _mixed_workload(pool, seed, operations):
    rng = random.Random(seed)
    volume = pool.volume("disk0")
    for _ in range(operations):
        kind = rng.random()
        offset = rng.randrange(0, VOLUME - 300_000)
        if kind < 0.7:
            volume.write(rng.randbytes(rng.randint(1, 300_000)), offset)
        elif kind < 0.8:
            volume.zero(offset, rng.randint(1, 300_000))
        elif kind < 0.9:
            volume.trim(offset, rng.randint(1, 300_000))
        else:
            pool.flush()


@pytest.mark.parametrize("stop", ["clean", "crash"])
def test_deleting_the_index_rebuilds_the_same_volume_content(stop, tmp_path):
    """Same bytes (sha256 of the whole volume) and same allocation map, whether the block map
    is kept or deleted and rebuilt from the log; after a clean close or after a crash."""
    path = str(tmp_path / "pool")
    make_pool(path, volume_size=VOLUME)
    pool = Pool.open(path)
    _mixed_workload(pool, 3, 160)
    pool.flush()
    _mixed_workload(pool, 4, 20)
    if stop == "clean":
        pool.close()
    else:
        pool.writer.drain()
        abandon(pool)
    copy = str(tmp_path / "copy")
    shutil.copytree(path, copy)
    shutil.rmtree(os.path.join(copy, "index"))
    with Pool.open(path) as kept, Pool.open(copy) as rebuilt:
        assert rebuilt.damage == [] and kept.damage == []
        assert _volume_hash(rebuilt) == _volume_hash(kept)
        assert rebuilt.volume("disk0").extents(0, VOLUME) == kept.volume("disk0").extents(0, VOLUME)


def test_reopen_after_clean_close_replays_nothing(tmp_path):
    """A clean close checkpoints the map at the end of the log: the next open applies no
    record and the replay counter does not move."""
    path = make_pool(str(tmp_path / "pool"), volume_size=VOLUME)
    with Pool.open(path) as pool:
        _mixed_workload(pool, 5, 50)
    stored = BlockMap(os.path.join(path, "index"))
    try:
        checkpoint = stored.read_checkpoint()
    finally:
        stored.close()
    with Pool.open(path) as pool:
        assert pool.recovery.records_applied == 0
        assert pool.recovery.cut_address == 0
        assert pool.records_replayed == checkpoint.records_replayed
        assert pool.recovery.end_address == checkpoint.log_address
        assert pool.damage == []


def _index_file(path):
    return os.path.join(path, "index", "data.mdb")


_OPEN_AND_READ = r"""
import random, sys
sys.path.insert(0, sys.argv[2])
from chunkvol.errors import ChunkvolError
from chunkvol.pool import Pool
try:
    with Pool.open(sys.argv[1]) as pool:
        buffer = bytearray(1 << 20)
        pool.volume("disk0").read(buffer, 0)
        print("same" if bytes(buffer) == random.Random("index-data").randbytes(1 << 20) else "different")
except ChunkvolError as error:
    print("refused:", error)
"""


def _open_in_child(path):
    """Open the pool and read 1 MiB in a child process (a crash must not take pytest down)."""
    return subprocess.run([os.path.join(ROOT, ".venv", "bin", "python"), "-c", _OPEN_AND_READ, path, ROOT],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("damage", ["empty", "truncate-half", "truncate-to-two-pages", "meta-pages-zeroed"])
def test_damaged_index_file_is_rebuilt_or_refused_never_crashes(damage, tmp_path):
    """The block map is a cache. A damaged index file either gets rebuilt from the log (same
    data), or the open refuses with a ChunkvolError; it never kills the process, and
    `chunkvol check --repair` (the documented way out) then gives back the right volume."""
    path = make_pool(str(tmp_path / "pool"), volume_size=VOLUME)
    with Pool.open(path) as pool:
        pool.volume("disk0").write(random.Random("index-data").randbytes(1 << 20), 0)
        for step in range(40):
            pool.volume("disk0").write(_data(f"more{step}", 100_000), (2 + step) * MiB)
    index = _index_file(path)
    size = os.path.getsize(index)
    if damage == "empty":
        os.truncate(index, 0)
    elif damage == "truncate-half":
        os.truncate(index, size // 2)
    elif damage == "truncate-to-two-pages":
        os.truncate(index, 8192)
    else:
        with open(index, "r+b") as handle:
            handle.write(bytes(8192))
    result = _open_in_child(path)
    assert result.returncode == 0, f"the open died (returncode {result.returncode}): {result.stderr[-500:]}"
    assert result.stdout.startswith(("same", "refused:")), result.stdout + result.stderr[-500:]
    if result.stdout.startswith("refused:"):
        repair = subprocess.run([os.path.join(ROOT, ".venv", "bin", "chunkvol"), "--pool", path, "check", "--repair"],
                                capture_output=True, text=True, timeout=120)
        assert repair.returncode == 0, repair.stdout + repair.stderr[-500:]
        assert _open_in_child(path).stdout.startswith("same")


def _rot_index(path, change):
    """Apply `change(txn, groups_db)` to the block map with LMDB itself: the effect of bit rot
    inside an LMDB value or key (LMDB keeps no checksums, so a flipped bit looks like this)."""
    import lmdb
    env = lmdb.open(os.path.join(path, "index"), map_size=1 << 40, subdir=True, max_dbs=4)
    try:
        groups = env.open_db(b"groups")
        with env.begin(write=True, db=groups) as txn:
            change(txn, groups)
    finally:
        env.close()


@pytest.mark.parametrize("rot", [
    "slot",
    pytest.param("version-order", marks=pytest.mark.xfail(strict=True, reason=(
        "KNOWN LIMIT: a flipped bit in a version key that makes the newest version sort after an "
        "older one is not detected: the older version is self-consistent (its value checksum binds "
        "its own key) and a live read does not look past it"))),
])
def test_bit_rot_in_the_index_never_returns_wrong_data(rot, tmp_path):
    """A flipped bit in the index may cost a rebuild or an error, never wrong data: a slot
    that now names the record's next block, or a newest version key that now sorts after an
    older version of the same group."""
    from chunkvol.format import group_map
    path = make_pool(str(tmp_path / "pool"), volume_size=VOLUME)
    old, new = _data("old", 64 << 10), _data("new", 64 << 10)
    with Pool.open(path) as pool:
        pool.volume("disk0").write(old, 0)
        pool.flush()  # a flush point between the two writes: two versions of group 0
        pool.volume("disk0").write(new, 0)
    volume_id = 1

    def change(txn, groups):
        cursor = txn.cursor()
        assert cursor.set_range(group_map.newest_key(volume_id, 0))
        key, value = cursor.key(), cursor.value()
        if rot == "slot":
            rotten = bytearray(value)
            rotten[group_map.VALUE_HEAD.size - 16] ^= 1  # slot 0: block 0 -> block 1 of the same record
            txn.put(key, bytes(rotten))
        else:
            volume, group, hlc, node = group_map.decode_key(key)
            txn.delete(key)
            txn.put(group_map.key(volume, group, hlc >> 1, node), value)  # the top bit of ~hlc flipped

    _rot_index(path, change)
    with Pool.open(path) as pool:
        try:
            data = _read(pool, 0, 64 << 10)
        except CorruptionError:
            return
        if data != new:  # not a bare `assert ==`: pytest would diff 64 KiB byte by byte
            pytest.fail("reads return " + ("the previous version" if data == old else "other blocks' data")
                        + " without an error")


# ---- chunk creation --------------------------------------------------------------------------

def test_interrupted_chunk_creation_leftover_is_removed(tmp_path):
    """A leftover chunk-*.cvc.new (creation interrupted before its rename) is removed at open,
    and the log goes on to create that chunk properly."""
    path = str(tmp_path / "pool")
    before = _two_chunk_pool(path)
    leftover = _chunk_path(path, 3) + ".new"
    with open(_chunk_path(path, 2), "rb") as handle:
        header = bytearray(handle.read(4096))
    with open(leftover, "wb") as handle:
        handle.write(header + b"half-written")
    with Pool.open(path) as pool:
        assert not os.path.exists(leftover)
        assert pool.damage == [] and pool.chunks.ids() == [1, 2]
        assert _volume_hash(pool) == before
        for step in range(16):
            pool.volume("disk0").write(_data(f"more{step}", 1 * MiB), (32 + step) * MiB)
        pool.flush()
        assert pool.chunks.ids() == [1, 2, 3]
    with Pool.open(path) as pool:
        assert pool.damage == []
        assert _read(pool, 47 * MiB, 1 * MiB) == _data("more15", 1 * MiB)


def test_power_loss_during_chunk_creation_leaves_a_usable_pool(tmp_path):
    """Power lost right after the new chunk's .new file was created and written, before its
    rename (the directory keeps the .new entry): the open removes it and nothing flushed is
    lost; the pool goes on into that chunk."""
    path = str(tmp_path / "pool")
    _two_chunk_pool(path)
    counter = FaultyFiles(path)
    creates = []
    original = counter.open_write

    def spy(name, create=False):
        if create:
            creates.append(counter.calls + 1)
        return original(name, create)

    counter.open_write = spy
    with track_index(counter):
        pool = Pool.open(path, files=counter)
        for step in range(16):
            pool.volume("disk0").write(_data(f"late{step}", 1 * MiB), (40 + step) * MiB)
            pool.flush()
        abandon(pool)
    assert creates, "the workload did not create chunk 3"
    work = str(tmp_path / "work")
    lost = str(tmp_path / "lost")
    shutil.rmtree(path)
    _two_chunk_pool(work)
    faulty = FaultyFiles(work, crash_at=creates[0] + 1, crash_after=False, crash_dir=lost,
                         dir_changes="all", modes=("keep",), index_modes=("snapshot",))
    flushed = 0
    with track_index(faulty):
        pool = Pool.open(work, files=faulty)
        try:
            for step in range(16):
                pool.volume("disk0").write(_data(f"late{step}", 1 * MiB), (40 + step) * MiB)
                pool.flush()
                flushed = step + 1
        except PowerLoss:
            pass
        abandon(pool)
    assert any(name.endswith(".cvc.new") for name in os.listdir(os.path.join(lost, "chunks"))), \
        f"no leftover .new file: {faulty.crashed}"
    with Pool.open(lost) as pool:
        assert not any(name.endswith(".new") for name in os.listdir(os.path.join(lost, "chunks")))
        assert pool.damage == []
        for step in range(flushed):
            assert _read(pool, (40 + step) * MiB, 1 * MiB) == _data(f"late{step}", 1 * MiB)
        for step in range(16):
            pool.volume("disk0").write(_data(f"again{step}", 1 * MiB), (40 + step) * MiB)
        pool.flush()
        assert max(pool.chunks.ids()) >= 3


# ---- a full disk -----------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["pwrite", "pwrite-partial", "preallocate", "open_create"])
def test_enospc_on_a_write_leaves_flushed_data_intact_and_the_pool_usable(fault, tmp_path):
    """ENOSPC (injected through the file seam) while writing: the client gets OutOfSpaceError,
    everything flushed before still reads back, and once space returns writes and flushes work
    and survive a reopen."""
    path = str(tmp_path / "pool")
    _two_chunk_pool(path)
    faulty = FaultyFiles(path, real_preallocate=True)
    pool = Pool.open(path, files=faulty)
    volume = pool.volume("disk0")
    volume.write(_data("kept", 256 << 10), 30 * MiB)
    volume.flush()
    op = "pwrite" if fault.startswith("pwrite") else fault
    faulty.faults.append(Fault(op, nth=1, error=errno.ENOSPC, count=None, partial=fault == "pwrite-partial"))
    failures = 0
    for step in range(40):  # enough to reach the next chunk (open_create) or a drain
        try:
            volume.write(_data(f"full{step}", 512 << 10), (32 + step % 16) * MiB)
            volume.flush()
        except OutOfSpaceError:
            failures += 1
            break
    assert failures, "the injected ENOSPC was never hit"
    with pytest.raises(OutOfSpaceError):
        volume.write(_data("still", 2 * MiB), 50 * MiB)
        volume.flush()
    assert _read(pool, 30 * MiB, 256 << 10) == _data("kept", 256 << 10)
    assert _read(pool, 0, 1 * MiB) == _data("fill0", 1 * MiB)
    faulty.clear_faults()  # the space came back
    volume.write(_data("after", 256 << 10), 60 * MiB)
    volume.flush()
    pool.close()
    with Pool.open(path) as pool:
        assert pool.damage == []
        assert _read(pool, 30 * MiB, 256 << 10) == _data("kept", 256 << 10)
        assert _read(pool, 60 * MiB, 256 << 10) == _data("after", 256 << 10)


def test_enospc_inside_a_request_then_crash_shows_exactly_the_flushed_state(tmp_path):
    """A 1 MiB write (16 records) fails with ENOSPC when the writer's buffer drains inside it;
    space returns, another write and a flush succeed; nothing is written after that flush.
    A crash must then show exactly what the server showed at that flush."""
    from chunkvol.log import writer as writer_module
    path = make_pool(str(tmp_path / "pool"), volume_size=VOLUME)
    faulty = FaultyFiles(path)
    pool = Pool.open(path, files=faulty)
    volume = pool.volume("disk0")
    volume.write(_data("old", 1 * MiB), 0)
    volume.flush()
    # Fill the writer's buffer so that it drains about 3 records (65736 bytes each) into the
    # next write.
    room = getattr(writer_module, "BUFFER_BYTES", 1 * MiB) - pool.writer.used
    volume.write(_data("filler", max(4096, (room - 3 * 65736) // 4096 * 4096)), 8 * MiB)
    faulty.faults.append(Fault("pwrite", nth=1, error=errno.ENOSPC))
    with pytest.raises(OutOfSpaceError):
        volume.write(_data("new", 1 * MiB), 0)
    volume.write(_data("S", 4096), 4 * MiB)
    volume.flush()
    served = _read(pool, 0, 1 * MiB)
    abandon(pool)  # kill -9: nothing was written after the flush
    with Pool.open(path) as pool:
        recovered = _read(pool, 0, 1 * MiB)
        new = _data("new", 1 * MiB)
        groups = [served[i:i + 65536] == new[i:i + 65536] for i in range(0, 1 * MiB, 65536)]
        after = [recovered[i:i + 65536] == new[i:i + 65536] for i in range(0, 1 * MiB, 65536)]
        assert recovered == served, (f"the failed write showed {sum(groups)} of 16 groups before the crash, "
                                     f"{sum(after)} after it")


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 40 MiB tmpfs, unmounted at the end (skips where mounting is not allowed)."""
    directory = tmp_path / "tiny"
    directory.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", str(directory)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield str(directory)
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def test_full_disk_through_nbd_keeps_flushed_data_and_serving(tmp_path, tiny_filesystem, server_factory):
    """Chunks on a 40 MiB tmpfs, 16 MiB chunks, a real nbdkit server: write and flush until the
    client gets ENOSPC. Everything flushed before reads back, the server keeps serving (reads,
    new connections), and after the filesystem grows writes work again and survive a restart."""
    path = str(tmp_path / "pool")
    make_pool(path, volume_size=256 * MiB, chunk_dirs=[tiny_filesystem])
    server = server_factory(path)
    handle = server.connect()
    flushed = []   # offsets of 1 MiB writes covered by a successful flush
    written = []
    error = None
    for step in range(120):
        try:
            handle.pwrite(_data(f"w{step}", 1 * MiB), step * MiB)
            written.append(step)
            if step % 4 == 3:
                handle.flush()
                flushed.extend(written)
                written = []
        except nbd.Error as failure:
            error = failure
            break
    assert error is not None, "the 40 MiB filesystem never filled up"
    assert error.errnum == errno.ENOSPC, error
    assert len(flushed) >= 20
    for step in flushed:
        assert handle.pread(1 * MiB, step * MiB) == _data(f"w{step}", 1 * MiB), step
    other = server.connect()
    assert other.pread(1 * MiB, flushed[-1] * MiB) == _data(f"w{flushed[-1]}", 1 * MiB)
    other.shutdown()
    subprocess.run(["mount", "-o", "remount,size=120M", tiny_filesystem], check=True)
    handle.pwrite(_data("again", 1 * MiB), 200 * MiB)
    handle.flush()
    handle.shutdown()
    server.stop()
    server.start()
    handle = server.connect()
    for step in flushed:
        assert handle.pread(1 * MiB, step * MiB) == _data(f"w{step}", 1 * MiB), step
    assert handle.pread(1 * MiB, 200 * MiB) == _data("again", 1 * MiB)
    handle.shutdown()
    server.kill()
