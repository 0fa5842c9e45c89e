"""History in-process: retention policy, pruning boundaries, rollback and its undo, clones of
clones, removal rules, past-point extents, and points thousands of flushes deep."""

import os
import shutil
import time

import pytest

from chunkvol import history
from chunkvol.errors import AlreadyExistsError, NotFoundError, ReadOnlyError, UsageError
from chunkvol.pool import Pool

MiB = 1 << 20


@pytest.fixture
def pool(tmp_path):
    path = str(tmp_path / "pool")
    Pool.create(path, chunk_size=16 * MiB)
    opened = Pool.open(path)
    opened.create_volume("v", 4 * MiB)
    yield opened
    if not opened.closed:
        opened.close()


def read(pool, point, length=4 * MiB, offset=0):
    buffer = bytearray(length)
    pool.volume(point).read(buffer, offset)
    return bytes(buffer)


def reopen(pool, rebuild=False):
    pool.close()
    if rebuild:
        shutil.rmtree(os.path.join(pool.path, "index"))
    return Pool.open(pool.path)


def test_retention_policy_thins_old_points_and_keeps_snapshots(pool):
    volume = pool.volume("v")
    contents = []
    for round_number in range(6):
        volume.write(bytes([round_number + 1]) * 4096, round_number * 4096)
        volume.flush()
        contents.append(read(pool, "v"))
        if round_number == 2:
            history.create_snapshot(pool, "v", "third")
    assert len(history.history_rows(pool, "v")) == 6
    # Two days later every point is older than the hourly window: one per day remains (the
    # last), and the snapshot.
    released = history.prune(pool, "v", None, now=time.time() + 2 * 86400)
    assert released == 5
    rows = history.history_rows(pool, "v")
    assert len(rows) == 1
    assert read(pool, "v@third") == contents[2]
    assert read(pool, f"v@{rows[0]['time']}") == contents[5]
    # Times before the oldest retained point are refused (the snapshot stays readable by name).
    snapshot_time = history.snapshot_rows(pool, "v")[0]["time"]
    with pytest.raises(UsageError, match="retention window.*snapshot list"):
        pool.volume(f"v@{snapshot_time}")
    pool = reopen(pool, rebuild=True)
    assert read(pool, "v@third") == contents[2]
    assert len(history.history_rows(pool, "v")) == 1
    pool.close()


def test_prune_keep_zero_then_times_before_are_refused(pool):
    volume = pool.volume("v")
    volume.write(b"a" * 4096, 0)
    volume.flush()
    old_time = history.history_rows(pool, "v")[0]["time"]
    time.sleep(0.01)
    volume.write(b"b" * 4096, 0)
    volume.flush()
    assert read(pool, f"v@{old_time}", 4096) == b"a" * 4096
    history.prune(pool, "v", 0)
    with pytest.raises(UsageError, match="retention window"):
        pool.volume(f"v@{old_time}")
    assert read(pool, "v", 4096) == b"b" * 4096
    with pytest.raises(UsageError, match="future"):
        pool.volume("v@2999-01-01T00:00:00Z")
    with pytest.raises(UsageError, match="created later"):
        pool.volume("v@2001-01-01T00:00:00Z")
    with pytest.raises(UsageError, match="not a valid time"):
        pool.volume("v@2026-13-45T00:00:00Z")
    with pytest.raises(NotFoundError):
        pool.volume("v@nosuch")
    with pytest.raises(UsageError):
        pool.volume("v@bad/name")


def test_rollback_is_a_new_point_and_can_be_undone(pool):
    volume = pool.volume("v")
    volume.write(b"1" * 8192, 0)
    history.create_snapshot(pool, "v", "one")
    volume.write(b"2" * 8192, 4096)
    volume.trim(65536, 65536)
    volume.flush()
    before = read(pool, "v")
    point, before_stamp, after_stamp = history.rollback(pool, "v@one")
    assert read(pool, "v") == read(pool, "v@one")
    assert before_stamp < after_stamp
    # The content just before the rollback is still a point of history.
    history.create_snapshot(pool, "v", "after-rollback")
    undo = f"v@{history.format_stamp(before_stamp)}"
    assert read(pool, undo) == before
    history.rollback(pool, undo)
    assert read(pool, "v") == before
    pool = reopen(pool, rebuild=True)
    assert read(pool, "v") == before
    assert read(pool, "v@after-rollback") == read(pool, "v@one")
    pool.close()


def test_clone_of_a_clone_and_removal_rules(pool):
    volume = pool.volume("v")
    volume.write(b"p" * 65536, 0)
    history.create_snapshot(pool, "v", "base")
    history.clone(pool, "v@base", "c1")
    pool.volume("c1").write(b"q" * 4096, 4096)
    history.create_snapshot(pool, "c1", "s")
    history.clone(pool, "c1@s", "c2")
    pool.volume("c2").write(b"r" * 4096, 8192)
    volume.write(b"x" * 65536, 0)  # the parent moves on; clones keep their snapshot's content
    expected = bytearray(b"p" * 65536)
    expected[4096:8192] = b"q" * 4096
    expected[8192:12288] = b"r" * 4096
    assert read(pool, "c2", 65536) == bytes(expected)
    assert read(pool, "c1", 65536)[:12288] == b"p" * 4096 + b"q" * 4096 + b"p" * 4096
    # Extents of a clone include what it shares with its parent.
    assert pool.volume("c2").extents(0, 4 * MiB)[0] == (0, 65536, 0)
    with pytest.raises(UsageError, match="clones"):
        history.remove_snapshot(pool, "v", "base")
    with pytest.raises(UsageError, match="clones"):
        pool.remove_volume("v", with_snapshots=True)
    history.create_snapshot(pool, "c2", "tmp")
    with pytest.raises(UsageError, match="1 snapshots"):
        pool.remove_volume("c2")
    history.remove_snapshot(pool, "c2", "tmp")
    with pytest.raises(AlreadyExistsError):
        history.clone(pool, "v@base", "c1")
    with pytest.raises(UsageError, match="snapshot"):
        history.clone(pool, f"v@{history.history_rows(pool, 'v')[-1]['time']}", "c3")
    history.prune(pool, "v", 0)
    history.prune(pool, "c1", 0)
    pool = reopen(pool, rebuild=True)
    assert read(pool, "c2", 65536) == bytes(expected)
    pool.remove_volume("c2")
    pool.remove_volume("c1", with_snapshots=True)
    history.remove_snapshot(pool, "v", "base")
    pool.remove_volume("v")
    assert pool.volumes == {}
    pool.close()


def test_past_point_views_are_read_only_and_report_their_extents(pool):
    volume = pool.volume("v")
    volume.write(b"d" * 8192, 65536)
    history.create_snapshot(pool, "v", "s")
    volume.write(b"e" * 65536, 0)
    view = pool.volume("v@s")
    assert view.readonly and view.name == "v@s"
    with pytest.raises(ReadOnlyError):
        view.write(b"x" * 4096, 0)
    with pytest.raises(ReadOnlyError):
        view.trim(0, 4096)
    assert view.extents(0, 4 * MiB) == [(0, 65536, 3), (65536, 8192, 0), (73728, 4 * MiB - 73728, 3)]
    with pytest.raises(AlreadyExistsError):
        history.create_snapshot(pool, "v", "s")


def test_a_snapshot_ten_thousand_flushes_deep_reads_like_a_live_volume(pool):
    volume = pool.volume("v")
    volume.write(b"s" * 4 * MiB, 0)
    history.create_snapshot(pool, "v", "deep")
    for number in range(10_000):
        volume.write(number.to_bytes(4, "little") * 1024, (number % 1024) * 4096)
        pool.flush_point()  # a flush point without waiting for the disk each time
    assert len(history.history_rows(pool, "v")) >= 10_000
    assert read(pool, "v@deep") == b"s" * 4 * MiB
    pool = reopen(pool)
    assert read(pool, "v@deep") == b"s" * 4 * MiB
    pool.close()


def test_diff_between_points_and_against_live(pool):
    volume = pool.volume("v")
    volume.write(b"a" * 3 * 65536, 0)
    history.create_snapshot(pool, "v", "a")
    volume.write(b"b" * 4096, 8192)
    volume.zero(2 * 65536, 65536)
    history.create_snapshot(pool, "v", "b")
    volume.write(b"c" * 4096, 3 * MiB)
    assert history.diff(pool, "v@a", "v@b") == [(8192, 4096, True), (2 * 65536, 65536, False)]
    assert history.diff(pool, "v@b") == [(3 * MiB, 4096, True)]
    assert history.diff(pool, "v@b", "v@b") == []
    pool.create_volume("w", MiB)
    history.create_snapshot(pool, "w", "b")
    with pytest.raises(UsageError, match="different volumes"):
        history.diff(pool, "v@a", "w@b")
    with pytest.raises(NotFoundError):
        history.diff(pool, "v@a", "nosuch@b")


def test_rollback_waits_for_clients_of_the_live_volume(pool):
    from chunkvol.errors import PoolBusyError
    volume = pool.volume("v")
    volume.write(b"1" * 4096, 0)
    history.create_snapshot(pool, "v", "one")
    volume.write(b"2" * 4096, 0)
    pool.connections.attach("v", live=False)  # a client reading a past point does not stop a rollback
    pool.connections.attach("v")
    with pytest.raises(PoolBusyError, match="1 NBD connection"):
        history.rollback(pool, "v@one")
    with pytest.raises(PoolBusyError, match="2 NBD connection"):
        pool.remove_volume("v", with_snapshots=True)
    assert read(pool, "v", 4096) == b"2" * 4096
    pool.connections.detach("v")
    history.rollback(pool, "v@one")
    assert read(pool, "v", 4096) == b"1" * 4096


def test_a_failed_retention_pass_does_not_fail_the_flush(pool, monkeypatch):
    """The server's periodic retention runs inside a flush: if it fails (a full disk), the
    flush still succeeds (its data is durable) and the failure is noted for `status`."""
    from chunkvol.errors import OutOfSpaceError
    from chunkvol.pool import journal

    def fail(_pool, now=None):
        raise OutOfSpaceError("no space for the PRUNE record")

    monkeypatch.setattr(history, "apply_retention", fail)
    monkeypatch.setattr(journal, "CHECKPOINT_SECONDS", 0.0)
    pool.last_retention_time = time.monotonic() - history.RETENTION_INTERVAL - 1
    volume = pool.volume("v")
    volume.write(b"r" * 4096, 0)
    volume.flush()
    assert any("retention pass failed" in note for note in pool.notes)
    pool = reopen(pool)
    assert read(pool, "v", 4096) == b"r" * 4096
    pool.close()


def test_a_past_point_read_over_nbd_is_held_while_prune_runs(pool_path, server_factory):
    """A backup reads disk0@<a time> over NBD while `chunkvol prune --keep 0s` releases that time
    (issue 14, item 4): the connection's point is held as a snapshot is, so every group reads as
    of the point (before: some groups read as of the next flush point, an image that never
    existed, passing every checksum); once the connection is gone, the point goes."""
    import nbd
    from tests.support.server import chunkvol
    server = server_factory(pool_path)
    size = 8 << 20
    old, new = bytes([1]) * size, bytes([2]) * size
    live = server.connect()
    live.pwrite(old, 0)
    live.flush()
    time.sleep(0.01)  # the point below names old's flush point, not new's
    point = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
    time.sleep(0.01)
    live.pwrite(new, 0)
    live.flush()
    backup = server.connect(f"disk0@{point}")
    first = backup.pread(size // 2, 0)
    chunkvol("--pool", pool_path, "prune", "disk0", "--keep", "0s")
    second = backup.pread(size // 2, size // 2)
    assert first + second == old, "the backup read an image that never existed"
    backup.shutdown()
    live.pwrite(new, 0)  # a flush point after the connection closed; then the point may go
    live.flush()
    chunkvol("--pool", pool_path, "prune", "disk0", "--keep", "0s")
    refused = nbd.NBD()
    refused.set_export_name(f"disk0@{point}")
    with pytest.raises(nbd.Error):
        refused.connect_unix(server.socket_path)
    live.shutdown()
