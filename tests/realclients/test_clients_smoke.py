"""Real clients against an NBD export: kernel filesystems (nbdfuse + loop), qemu and UML boots.

The tests taking the `export` fixture run on every kind in
$CHUNKVOL_REALCLIENTS_KINDS (default "file,chunkvol", see conftest.py): nbdkit's
file plugin proves the tooling in tools/guest, chunkvol runs the same checks on
the store.  Tests about the tooling's own failure paths use the file plugin
only.  The store's acceptance tests are in test_chunkvol_clients.py.  Every
test is leak-checked by conftest.no_leaks (mounts, loop devices, processes).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tools.guest import build_initramfs, export as export_ops, fs, guest, uml
from tools.guest.nbdfuse import attached, fuse_file, mounts_of_device
from tools.guest.nbdkit import served
from tools.guest.vm import GuestError

pytestmark = pytest.mark.realclients


def _loop_detached(dev: str) -> bool:
    return not Path(f"/sys/block/{Path(dev).name}/loop/backing_file").exists()


def test_attach_gives_block_device_of_export_size(export):
    with attached(export.socket, export.name, export.workdir) as dev:
        size = int(subprocess.run(["blockdev", "--getsize64", dev], capture_output=True, text=True,
                                  check=True).stdout)
        assert size == export_ops.export_size(export.socket, export.name)
    assert _loop_detached(dev)


@pytest.mark.parametrize("fstype", fs.FSTYPES)
def test_filesystem_roundtrip(export, fstype, tmp_path):
    """mkfs, copy a mixed tree, detach; re-attach read-only through a fresh nbdfuse: fsck clean, tree equal."""
    src = tmp_path / "src"
    fs.make_sample_tree(src, seed=7)
    with attached(export.socket, export.name, export.workdir) as dev:
        fs.mkfs(dev, fstype)
        with fs.mounted(dev, tmp_path / "mnt"):
            fs.copy_tree(src, tmp_path / "mnt")
    with attached(export.socket, export.name, export.workdir, readonly=True) as dev:
        check = fs.fsck(dev)
        assert check.clean, str(check)
        assert check.fstype == fstype
        with fs.mounted(dev, tmp_path / "mnt", options="ro"):
            assert fs.compare_trees(src, tmp_path / "mnt") == []


def test_export_names_select_distinct_volumes(tmp_path):
    """The export name (including awkward characters) must reach the server intact."""
    pool = tmp_path / "pool"
    pool.mkdir()
    names = ["vol-a", "vol b", "vol%c?d&e"]
    for name in names:
        with open(pool / name, "wb") as f:
            f.truncate(64 << 20)
    with served(["file", f"dir={pool}"], tmp_path / "srv") as server:
        for i, name in enumerate(names):
            with fuse_file(server, name, tmp_path) as disk:
                with open(disk, "r+b") as f:
                    f.write(f"volume {i}".encode())
        for i, name in enumerate(names):
            assert (pool / name).read_bytes()[:8] == f"volume {i}".encode()
            assert export_ops.export_size(server, name) == 64 << 20


def test_teardown_after_failure_inside_block(export, tmp_path):
    """An exception with a filesystem still mounted must not leave mount, loop device or nbdfuse behind."""
    with pytest.raises(RuntimeError, match="boom"):
        with attached(export.socket, export.name, export.workdir) as dev:
            fs.mkfs(dev, "ext4")
            fs.mount(dev, tmp_path / "left-mounted")
            (tmp_path / "left-mounted" / "f").write_bytes(os.urandom(1 << 20))
            raise RuntimeError("boom")
    assert _loop_detached(dev)
    # no_leaks (conftest) verifies the FUSE mount and the nbdfuse process are gone too.


def test_teardown_after_server_crash(file_pool_export, tmp_path):
    """If the server dies under a mounted filesystem, teardown still completes and cleans up."""
    exp = file_pool_export
    with attached(exp.socket, exp.name, exp.workdir) as dev:
        fs.mkfs(dev, "ext4")
        fs.mount(dev, tmp_path / "mnt")
        (tmp_path / "mnt" / "f").write_bytes(os.urandom(1 << 20))
        exp.server.kill()
    assert _loop_detached(dev)


def test_fsck_and_compare_detect_damage(file_pool_export, tmp_path):
    """The verdict helpers must be able to say "no": damaged metadata, a changed file."""
    exp = file_pool_export
    src = tmp_path / "src"
    fs.make_sample_tree(src, seed=3, files=10)
    with attached(exp.socket, exp.name, exp.workdir) as dev:
        fs.mkfs(dev, "ext4")
        with fs.mounted(dev, tmp_path / "mnt") as mnt:
            fs.copy_tree(src, mnt)
            assert fs.compare_trees(src, mnt) == []
            target = next(p for p in sorted(mnt.rglob("*.bin")) if p.stat().st_size > 0)
            data = bytearray(target.read_bytes())
            data[0] ^= 0xFF
            target.write_bytes(bytes(data))
            diffs = fs.compare_trees(src, mnt)
            assert len(diffs) == 1 and diffs[0].startswith("differs: ")
        assert mounts_of_device(dev) == []
    # Overwrite the block holding the root directory's inode, behind the filesystem's back.
    with attached(exp.socket, exp.name, exp.workdir) as dev:
        header = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True, check=True).stdout
        block_size = int(header.split("Block size:")[1].split()[0])
        where = subprocess.run(["debugfs", "-R", "imap <2>", dev], capture_output=True, text=True,
                               check=True).stdout
        block = int(where.split("located at block ")[1].split(",")[0])
        with open(dev, "r+b") as f:
            f.seek(block * block_size)
            f.write(os.urandom(block_size))
            os.fsync(f.fileno())
    with attached(exp.socket, exp.name, exp.workdir, readonly=True) as dev:
        check = fs.fsck(dev)
    assert not check.clean, str(check)


def test_guest_images_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CHUNKVOL_GUEST_CACHE", str(tmp_path / "cache"))
    first = build_initramfs.guest_images()
    mtime = first.rootfs.stat().st_mtime_ns
    second = build_initramfs.guest_images()
    assert second == first
    assert second.rootfs.stat().st_mtime_ns == mtime
    assert first.rootfs.parent.parent == tmp_path / "cache"


@pytest.mark.vm
def test_qemu_boots_with_export_as_root_disk(export, guest_images):
    """qemu (TCG) boots the Debian kernel; root=/dev/vda is the export; the guest's write reads back."""
    rt = guest.roundtrip(export.socket, export.name, export.workdir, client="qemu", images=guest_images)
    assert rt.boot.fields["root"] == "/dev/vda:ext4"
    assert rt.output.result["kernel"] == guest_images.kernel.version
    print(f"qemu round trip: {rt.seconds}")


@pytest.mark.vm
@pytest.mark.uml
def test_uml_boots_from_nbdfuse_file(export, guest_images):
    """user-mode-linux boots from the nbdfuse file of the export; the guest's write reads back."""
    rt = guest.roundtrip(export.socket, export.name, export.workdir, client="uml", images=guest_images)
    assert rt.boot.fields["root"].endswith(":ext4")
    print(f"uml round trip: {rt.seconds}")


@pytest.mark.vm
@pytest.mark.uml
def test_reboot_same_volume_twice(file_pool_export, guest_images):
    """The root filesystem left by one boot must boot again (no reinstall): state persists across boots."""
    exp = file_pool_export
    guest.roundtrip(exp.socket, exp.name, exp.workdir, client="uml", images=guest_images)
    rt = guest.roundtrip(exp.socket, exp.name, exp.workdir, client="qemu", images=guest_images, install=False)
    assert rt.output.fsck.clean


@pytest.mark.vm
@pytest.mark.uml
def test_guest_failure_is_reported(file_pool_export, guest_images):
    """A root disk without a marker makes the guest report FAIL; check() raises with the console tail."""
    exp = file_pool_export
    export_ops.write_image(exp.socket, exp.name, guest_images.rootfs)
    result = uml.boot_uml_export(exp.socket, exp.name, exp.workdir)
    assert not result.ok and result.result_line.startswith("FAIL")
    with pytest.raises(GuestError, match="no /guest/marker"):
        result.check()


@pytest.mark.vm
@pytest.mark.uml
def test_hung_guest_is_killed_at_timeout(file_pool_export, guest_images):
    """A guest that never reports (busybox init as PID 1 waits forever) is killed at the timeout."""
    exp = file_pool_export
    guest.prepare_root(exp.socket, exp.name, exp.workdir, images=guest_images)
    result = uml.boot_uml_export(exp.socket, exp.name, exp.workdir, timeout=5, append="init=/bin/init")
    assert result.timed_out and not result.ok
    assert result.result_line is None
    # no_leaks (conftest) verifies no UML process survived.
