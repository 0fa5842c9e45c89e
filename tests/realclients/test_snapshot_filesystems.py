"""Snapshots under a real filesystem: ext4 on a chunkvol volume through nbdfuse + a loop device,
snapshots taken with `chunkvol snapshot create` beside the running server while ext4 is mounted.

  1. test_ext4_snapshot_export_and_clone: a snapshot of a frozen ext4 (fsfreeze: the journal
     is checkpointed, the image is clean) is attached read-only as the export VOL@NAME while
     the live filesystem goes on changing: `fsck -n` is clean and `mount -o ro,noload` shows
     exactly the files of snapshot time. A clone of it is mounted read-write, changed,
     unmounted and checks clean; the snapshot and the live volume are unchanged by that.
  2. test_ext4_crash_consistent_snapshot_and_rollback: a snapshot after `sync -f` only (the
     journal still to replay, like a power cut): read-only it checks (`fsck -n`) and mounts
     (`ro,noload`) with every synced file, and its clone mounts read-write (journal replay)
     with them too; then the live volume is rolled back to the frozen snapshot, checks
     clean, and the printed undo command brings the later files back.

Mounts, loop devices, nbdfuse processes and servers are torn down by the context managers of
tools/guest and the fixtures, also on failure (conftest.no_leaks checks).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.server import chunkvol
from tools.guest import fs
from tools.guest.nbdfuse import attached

pytestmark = pytest.mark.realclients

VOLUME = "vol0"


def make_pool(tmp_path: Path) -> str:
    pool = str(tmp_path / "pool")
    chunkvol("--pool", pool, "init", "--chunk-size", "16M")
    chunkvol("--pool", pool, "volume", "create", VOLUME, "--size", "256M")
    return pool


def check_pool(pool: str) -> None:
    result = chunkvol("--pool", pool, "check", "--json", check=False)
    assert result.returncode == 0, f"chunkvol check exited {result.returncode}: {result.stderr}{result.stdout}"
    report = json.loads(result.stdout)
    assert report["log_damage"] == [] and report["map_differences"] == [], report


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}: {result.stderr}{result.stdout}"
    return result.stdout


def sync_fs(mountpoint: Path) -> None:
    """syncfs(2): writeback, journal commit, a FLUSH to the device."""
    _run(["sync", "--file-system", str(mountpoint)])


@contextlib.contextmanager
def frozen(mountpoint: Path) -> Iterator[None]:
    """fsfreeze: ext4 writes everything back, checkpoints its journal and marks itself clean;
    always thawed again (a frozen filesystem would hang the unmount)."""
    _run(["fsfreeze", "--freeze", str(mountpoint)])
    try:
        yield
    finally:
        _run(["fsfreeze", "--unfreeze", str(mountpoint)])


def snapshot(pool: str, point: str) -> None:
    result = chunkvol("--pool", pool, "snapshot", "create", point)
    assert result.stdout.startswith(f"created snapshot {point} "), result.stdout


def needs_recovery(dev: str) -> bool:
    """Whether the ext4 on DEV has a journal to replay (mounted, or cut off while mounted)."""
    features = [line for line in _run(["dumpe2fs", "-h", dev]).splitlines() if line.startswith("Filesystem features:")]
    assert len(features) == 1, features
    return "needs_recovery" in features[0].split()


def assert_fsck_clean(dev: str) -> None:
    check = fs.fsck(dev, "ext4")
    assert check.clean, str(check)


def test_ext4_snapshot_export_and_clone(tmp_path, server_factory):
    pool = make_pool(tmp_path)
    server = server_factory(pool)
    first, second, third = tmp_path / "src-first", tmp_path / "src-second", tmp_path / "src-third"
    fs.make_sample_tree(first, seed=71, files=25, max_file_size=1 << 20)
    fs.make_sample_tree(second, seed=72, files=15, max_file_size=1 << 20)
    fs.make_sample_tree(third, seed=73, files=10, max_file_size=1 << 20)
    live_mnt, snap_mnt, clone_mnt = tmp_path / "mnt-live", tmp_path / "mnt-snap", tmp_path / "mnt-clone"

    with attached(server.socket_path, VOLUME, tmp_path) as dev:
        fs.mkfs(dev, "ext4", block_size=4096)
        with fs.mounted(dev, live_mnt):
            fs.copy_tree(first, live_mnt / "first")
            sync_fs(live_mnt)
            with frozen(live_mnt):
                snapshot(pool, f"{VOLUME}@frozen")
            # The live filesystem moves on: new files, a deleted directory, a changed file.
            fs.copy_tree(second, live_mnt / "second")
            _run(["rm", "-r", str(live_mnt / "first" / "d1")])
            with open(live_mnt / "first" / "d0" / "sub0" / "f0.bin", "r+b") as handle:
                handle.write(b"changed after the snapshot")
            sync_fs(live_mnt)
            live_tree = fs.tree_digest(live_mnt)

            # The snapshot, read-only, while the live filesystem is still mounted.
            with attached(server.socket_path, f"{VOLUME}@frozen", tmp_path, readonly=True) as snap_dev:
                assert fs.detect_fstype(snap_dev) == "ext4"
                assert not needs_recovery(snap_dev)  # frozen: the journal was checkpointed
                assert_fsck_clean(snap_dev)
                with fs.mounted(snap_dev, snap_mnt, options="ro,noload"):
                    assert fs.compare_trees(first, snap_mnt / "first") == []
                    assert sorted(p.name for p in snap_mnt.iterdir()) == ["first", "lost+found"]
                    # The device is read-only (the export refuses writes too: tests/cli/test_snapshots_cli.py).
                    written = subprocess.run(["dd", "if=/dev/zero", f"of={snap_dev}", "bs=4096", "count=1",
                                              "oflag=direct"], capture_output=True, text=True)
                    assert written.returncode != 0, "a write to the snapshot's device succeeded"
            assert fs.tree_digest(live_mnt) == live_tree
        assert_fsck_clean(dev)

    # A clone of the snapshot: read-write, changed, checked.
    result = chunkvol("--pool", pool, "snapshot", "clone", f"{VOLUME}@frozen", "clone0")
    assert "cloned" in result.stdout and "clone0" in result.stdout
    expected = tmp_path / "expected-clone"
    fs.copy_tree(first, expected / "first")
    fs.copy_tree(third, expected / "third")
    _run(["rm", "-r", str(expected / "first" / "d2")])
    with attached(server.socket_path, "clone0", tmp_path) as clone_dev:
        assert_fsck_clean(clone_dev)
        with fs.mounted(clone_dev, clone_mnt):
            assert fs.compare_trees(first, clone_mnt / "first") == []
            fs.copy_tree(third, clone_mnt / "third")
            _run(["rm", "-r", str(clone_mnt / "first" / "d2")])
        assert_fsck_clean(clone_dev)
        with fs.mounted(clone_dev, clone_mnt, options="ro"):
            assert fs.compare_trees(expected, clone_mnt) == []

    # Neither the snapshot nor the live volume saw the clone's writes.
    with attached(server.socket_path, f"{VOLUME}@frozen", tmp_path, readonly=True) as snap_dev:
        assert_fsck_clean(snap_dev)
        with fs.mounted(snap_dev, snap_mnt, options="ro,noload"):
            assert fs.compare_trees(first, snap_mnt / "first") == []
            assert not (snap_mnt / "third").exists()
    with attached(server.socket_path, VOLUME, tmp_path, readonly=True) as dev:
        assert_fsck_clean(dev)
        with fs.mounted(dev, live_mnt, options="ro"):
            assert fs.tree_digest(live_mnt) == live_tree

    # All of it survives a server restart, and the pool checks clean.
    server.stop()
    check_pool(pool)
    server.start()
    with attached(server.socket_path, "clone0", tmp_path, readonly=True) as clone_dev:
        assert_fsck_clean(clone_dev)
        with fs.mounted(clone_dev, clone_mnt, options="ro"):
            assert fs.compare_trees(expected, clone_mnt) == []


UNDO = re.compile(r"rolled back \S+ to \S+; to undo: chunkvol snapshot rollback (\S+)\n")


def test_ext4_crash_consistent_snapshot_and_rollback(tmp_path, server_factory):
    pool = make_pool(tmp_path)
    server = server_factory(pool)
    first, second = tmp_path / "src-first", tmp_path / "src-second"
    fs.make_sample_tree(first, seed=81, files=20, max_file_size=1 << 20)
    fs.make_sample_tree(second, seed=82, files=20, max_file_size=1 << 20)
    mnt = tmp_path / "mnt"

    with attached(server.socket_path, VOLUME, tmp_path) as dev:
        fs.mkfs(dev, "ext4", block_size=4096)
        with fs.mounted(dev, mnt):
            fs.copy_tree(first, mnt / "first")
            sync_fs(mnt)
            with frozen(mnt):
                snapshot(pool, f"{VOLUME}@clean")
            fs.copy_tree(second, mnt / "second")
            sync_fs(mnt)
            # No freeze: the journal holds metadata not yet in place, as after a power cut.
            snapshot(pool, f"{VOLUME}@synced")
            (mnt / "after-synced").write_bytes(b"not in any snapshot")
    with attached(server.socket_path, VOLUME, tmp_path, readonly=True) as dev:
        assert_fsck_clean(dev)
        with fs.mounted(dev, mnt, options="ro"):
            final_tree = fs.tree_digest(mnt)
    assert "after-synced" in final_tree

    # The crash-consistent snapshot: its clone replays the journal on a read-write mount.
    # Read-only as it is: e2fsck -n skips the journal (only the free counts lag, which it does not
    # count as errors) and `mount -o ro,noload` shows the synced files (syncfs also wrote the
    # metadata in place).
    with attached(server.socket_path, f"{VOLUME}@synced", tmp_path, readonly=True) as dev:
        assert needs_recovery(dev)
        assert_fsck_clean(dev)
        with fs.mounted(dev, mnt, options="ro,noload"):
            assert fs.compare_trees(first, mnt / "first") == []
            assert fs.compare_trees(second, mnt / "second") == []
            assert not (mnt / "after-synced").exists()
    chunkvol("--pool", pool, "snapshot", "clone", f"{VOLUME}@synced", "recovered")
    with attached(server.socket_path, "recovered", tmp_path) as dev:
        assert needs_recovery(dev)
        with fs.mounted(dev, mnt):
            assert fs.compare_trees(first, mnt / "first") == []
            assert fs.compare_trees(second, mnt / "second") == []
            assert not (mnt / "after-synced").exists()
        assert_fsck_clean(dev)

    # Roll the live volume back to the frozen snapshot (no client attached), then undo that.
    result = chunkvol("--pool", pool, "snapshot", "rollback", f"{VOLUME}@clean")
    undo = UNDO.fullmatch(result.stdout)
    assert undo, result.stdout
    with attached(server.socket_path, VOLUME, tmp_path, readonly=True) as dev:
        assert_fsck_clean(dev)
        with fs.mounted(dev, mnt, options="ro"):
            assert fs.compare_trees(first, mnt / "first") == []
            assert sorted(p.name for p in mnt.iterdir()) == ["first", "lost+found"]
    chunkvol("--pool", pool, "snapshot", "rollback", undo.group(1))
    with attached(server.socket_path, VOLUME, tmp_path) as dev:
        assert_fsck_clean(dev)
        with fs.mounted(dev, mnt):
            assert fs.tree_digest(mnt) == final_tree
            (mnt / "after-undo").write_bytes(b"written after the undo")
        assert_fsck_clean(dev)
    server.stop()
    check_pool(pool)
