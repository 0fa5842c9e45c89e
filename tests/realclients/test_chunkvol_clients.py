"""Acceptance tests: real clients on chunkvol volumes.

Each test runs chunkvol's own nbdkit plugin (tests.support.server.NbdServer) on a fresh pool with
16 MiB chunks, so every test's log spans several chunks (chunk switches and SEAL records
happen under real clients), and volumes of 384 MiB.  The clients are the kernel's ext4 and
xfs (through nbdfuse + a loop device), qemu's NBD client under a booting Linux, and
user-mode-linux's ubd driver on the nbdfuse file.  Afterwards the pool on disk is checked
with `chunkvol check` (every record's checksum, block map against the log).

  1. test_filesystem_on_volume, test_ext4_on_compressed_volume: mkfs, copy a tree in, umount,
     fsck clean, remount, tree identical (ext4 with 1 KiB and 4 KiB blocks, xfs; ext4 on zstd).
  2. test_kill9_under_mounted_ext4: three seeded kill -9 cycles under a mounted ext4 (also on
     a zstd volume); test_two_volumes_at_once_kill9: ext4 and xfs on two volumes of one pool.
  3./4. test_guest_boots_from_volume: qemu and UML boot from a volume; the host verifies the
     guest's writes, also after a server restart.
  5. test_filesystem_survives_clean_restart: SIGTERM between runs, `chunkvol check` clean.
  Also: test_grow_volume_under_ext4 (volume resize + resize2fs), test_full_disk_under_ext4
  (a client fills the pool's disk), and one-line errors from commands on a full disk.

The kill -9 tests are seeded ($CHUNKVOL_KILL_SEED, default 20240611): the seed picks the order
of the kill points, how far past the last sync the log has grown when the server is killed,
and what is deleted between cycles.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.realclients import CHUNK_BYTES, VOLUME, check_pool, make_pool, stop_cleanly
from tests.support.server import NbdServer, chunkvol
from tests.support.unsynced import check_maybe_lost as _check_maybe_lost
from tools.guest import fs, guest
from tools.guest.nbdfuse import attached

pytestmark = pytest.mark.realclients

KILL_SEED = int(os.environ.get("CHUNKVOL_KILL_SEED", "20240611"))


# --- pool and server helpers ---------------------------------------------------------------

def _run(argv: list[str]) -> str:
    """Run a system command; fail the test with its output unless it exits 0; return stdout."""
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}: {result.stderr}{result.stdout}"
    return result.stdout


def pool_status(pool: str) -> dict:
    return json.loads(chunkvol("--pool", pool, "status", "--json").stdout)


def log_bytes(pool: str) -> int:
    """Bytes in the pool's chunk files: grows as the server drains its log buffer."""
    chunks = Path(pool) / "chunks"
    return sum(p.stat().st_size for p in chunks.glob("chunk-*.cvc"))


def fs_roundtrip(server: NbdServer, volume: str, fstype: str, tmp_path: Path, *, seed: int,
                 block_size: int | None = None) -> None:
    """mkfs, copy a sample tree in, umount; fsck clean; remount (fresh nbdfuse): tree identical."""
    src = tmp_path / f"src-{volume}"
    written = fs.make_sample_tree(src, seed=seed)
    assert written > 2 * CHUNK_BYTES  # the copy alone crosses chunk boundaries
    with attached(server.socket_path, volume, tmp_path) as dev:
        fs.mkfs(dev, fstype, block_size=block_size)
        with fs.mounted(dev, tmp_path / "mnt") as mnt:
            fs.copy_tree(src, mnt)
        check = fs.fsck(dev)
        assert check.clean, str(check)
        assert check.fstype == fstype
    with attached(server.socket_path, volume, tmp_path) as dev:
        with fs.mounted(dev, tmp_path / "mnt") as mnt:
            assert fs.compare_trees(src, mnt) == []


# --- 1. filesystems through nbdfuse + loop -----------------------------------------------------

# ext4 on a 384 MiB device defaults to 1 KiB blocks: every write is 1 KiB-granular, so the
# store's read-modify-write of partial 4 KiB blocks is on the path.  4 KiB blocks are the
# common case; xfs is the second journaling filesystem, with its own write pattern.
FILESYSTEMS = [pytest.param("ext4", 1024, id="ext4-1k"), pytest.param("ext4", 4096, id="ext4-4k"),
               pytest.param("xfs", None, id="xfs")]


@pytest.mark.parametrize("fstype,block_size", FILESYSTEMS)
def test_filesystem_on_volume(fstype, block_size, tmp_path, server_factory):
    """mkfs, copy a tree in, umount, fsck clean, remount: identical; the pool checks clean."""
    pool = make_pool(tmp_path)
    server = server_factory(pool)
    fs_roundtrip(server, VOLUME, fstype, tmp_path, seed=11, block_size=block_size)
    stop_cleanly(server)
    status = pool_status(pool)
    assert len(status["chunks"]) >= 3, status["chunks"]  # the filesystem's writes crossed chunk switches
    check_pool(pool)


def test_ext4_on_compressed_volume(tmp_path, server_factory):
    """The same round trip on a zstd volume; the store really compressed what ext4 wrote."""
    pool = make_pool(tmp_path, ("zvol", "zstd"))
    server = server_factory(pool)
    fs_roundtrip(server, "zvol", "ext4", tmp_path, seed=12)
    stop_cleanly(server)
    volume = pool_status(pool)["volumes"]["zvol"]
    assert volume["compression"] == "zstd"
    # The sample tree holds zero-filled and repeated-block files, and mkfs's metadata is mostly zeros.
    assert volume["compression_ratio"] > 1.2, volume
    assert volume["stored_bytes"] < volume["mapped_bytes"], volume
    check_pool(pool)


# --- 2. kill -9 of the server under a mounted ext4 ---------------------------------------------

def _sync_command(mountpoint: Path) -> list[str]:
    """`sync -f`: syncfs(2) of that filesystem only (writeback, journal commit, device flush)."""
    return ["sync", "--file-system", str(mountpoint)]


def _copy_synced(src: Path, dst: Path) -> None:
    fs.copy_tree(src, dst)
    subprocess.run(_sync_command(dst), check=True, capture_output=True)


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    """Poll; the timeout only stops a hang, it asserts nothing about speed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.01)


class FsyncWriter(threading.Thread):
    """Write SRC's files into DST one at a time, each followed by fsync of the file and its
    directory; `durable` lists the files whose fsyncs returned success.  Stops at the first
    error (the server is gone)."""

    def __init__(self, src: Path, dst: Path):
        super().__init__(daemon=True)
        self.src, self.dst = src, dst
        self.durable: list[str] = []
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            for path in sorted(self.src.rglob("*.bin")):
                rel = path.relative_to(self.src)
                target = self.dst / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                directories = [self.dst.parent, self.dst] + [self.dst / p for p in reversed(rel.parents)][1:]
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    data = memoryview(path.read_bytes())
                    while data:  # unbuffered: fsync must see every byte
                        data = data[os.write(fd, data):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                for directory in directories:  # the new directory entries, top down
                    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                self.durable.append(str(rel))
        except OSError as error:
            self.error = error


def _compare_files(src: Path, dst: Path, names: list[str]) -> list[str]:
    problems = []
    for name in names:
        target = dst / name
        if not target.is_file():
            problems.append(f"missing after fsync: {name}")
        elif target.read_bytes() != (src / name).read_bytes():
            problems.append(f"differs after fsync: {name}")
    return problems


@pytest.mark.parametrize("block_size,compression", [(1024, "none"), (4096, "none"), (1024, "zstd")],
                         ids=["1k", "4k", "1k-zstd"])
def test_kill9_under_mounted_ext4(block_size, compression, tmp_path, server_factory):
    """Three crash cycles: write + sync, write more, kill -9 the server with ext4 mounted, clean
    up the dead attachment, restart on the same pool, mount (journal replay): everything synced
    is there and identical, nothing unsynced holds foreign bytes, e2fsck -fn is clean.

    Each cycle after the first deletes a seeded earlier directory (mounted with -o discard,
    so the store sees trims) before writing, so new files reuse trimmed blocks; stale bytes
    of deleted files showing up in new ones would fail the "no foreign bytes" check.

    Kill points (order seeded): "page-cache" (unsynced data only dirty in the page cache),
    "writeback" (a `sync` is in flight), "fsync" (a writer fsyncs file after file).  For the
    last two the server dies once the log has grown a seeded number of bytes past the sync.
    """
    rng = random.Random(f"{KILL_SEED}-{block_size}-{compression}")
    points = ["page-cache", "writeback", "fsync"]
    rng.shuffle(points)
    pool = make_pool(tmp_path, (VOLUME, compression))
    server = server_factory(pool)
    src = tmp_path / "src"
    mnt = tmp_path / "mnt"
    synced: list[str] = []             # directories under src/ and mnt/ that were synced
    maybe: list[str] = []              # written without sync: may be lost
    fsynced: dict[str, list[str]] = {}  # directory -> files whose fsync returned
    report = []

    def verify(dev: str, cycle: int) -> None:
        history = "\n".join(report)
        with fs.mounted(dev, mnt):  # replays the journal
            for name in synced:
                assert fs.compare_trees(src / name, mnt / name) == [], f"after crash {cycle}: {name}\n{history}"
            for name, files in fsynced.items():
                assert _compare_files(src / name, mnt / name, files) == [], f"after crash {cycle}\n{history}"
            for name in maybe:
                assert _check_maybe_lost(src / name, mnt / name) == [], f"after crash {cycle}\n{history}"
        check = fs.fsck(dev, "ext4")
        assert check.clean, f"after crash {cycle}: {check}\n{history}"

    for cycle, point in enumerate(points):
        with attached(server.socket_path, VOLUME, tmp_path) as dev:
            if cycle == 0:
                fs.mkfs(dev, "ext4", block_size=block_size)
            else:
                verify(dev, cycle)
            fs.mount(dev, mnt, options="discard")  # deletes reach the store as trims
            if cycle > 0:  # free blocks for this cycle's writes to reuse: trim, then overwrite
                gone = rng.choice(synced + maybe)
                subprocess.run(["rm", "-rf", str(mnt / gone)], check=True)
                for kept in (synced, maybe):
                    if gone in kept:
                        kept.remove(gone)
                fsynced.pop(gone, None)
                report.append(f"cycle {cycle}: deleted {gone}")
            name = f"synced-{cycle}"
            fs.make_sample_tree(src / name, seed=rng.randrange(1 << 30), files=20, max_file_size=2 << 20)
            _copy_synced(src / name, mnt / name)
            synced.append(name)
            after_sync = log_bytes(pool)
            name = f"{point}-{cycle}"
            size = fs.make_sample_tree(src / name, seed=rng.randrange(1 << 30), files=20, max_file_size=2 << 20)
            grow = rng.randrange(1 << 20, max(2 << 20, size // 2))
            if point == "page-cache":
                fs.copy_tree(src / name, mnt / name)
                maybe.append(name)
                server.kill()
                note = ""
            elif point == "writeback":
                fs.copy_tree(src / name, mnt / name)
                maybe.append(name)
                sync = subprocess.Popen(_sync_command(mnt), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                try:
                    _wait_for(lambda: sync.poll() is not None or log_bytes(pool) >= after_sync + grow,
                              "the log to grow during sync")
                    finished = sync.poll() is not None
                    server.kill()
                finally:
                    sync.wait(timeout=120)  # returns (with EIO) once the server is gone
                note = " (sync had finished)" if finished else f" (sync in flight, then exited {sync.returncode})"
            else:
                writer = FsyncWriter(src / name, mnt / name)
                writer.start()
                try:
                    _wait_for(lambda: not writer.is_alive() or log_bytes(pool) >= after_sync + grow,
                              "the log to grow during fsyncs")
                    server.kill()
                finally:
                    writer.join(timeout=120)
                assert not writer.is_alive(), "fsync writer hangs after the server was killed"
                fsynced[name] = writer.durable
                maybe.append(name)
                note = f" ({len(writer.durable)} of {len(list((src / name).rglob('*.bin')))} files fsynced)"
            report.append(f"cycle {cycle}: killed at {point}, log +{log_bytes(pool) - after_sync} bytes "
                          f"past the sync (target +{grow}){note}")
        # attached() has torn down the mount, loop device and nbdfuse of the dead server
        server.start()

    with attached(server.socket_path, VOLUME, tmp_path) as dev:
        verify(dev, len(points))
    stop_cleanly(server)
    check_pool(pool)
    print("\n".join(report))


def _in_parallel(*jobs) -> None:
    """Run the callables at once in threads; re-raise the first exception."""
    errors: list[BaseException] = []

    def wrap(job):
        try:
            job()
        except BaseException as error:  # noqa: BLE001 (re-raised below)
            errors.append(error)
    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_two_volumes_at_once_kill9(tmp_path, server_factory):
    """ext4 on a plain volume and xfs on a zstd volume of one pool, written at the same time (so
    their records interleave in one log), synced, written more, kill -9: after the restart both
    filesystems replay their journals, hold their synced trees and check clean."""
    pool = make_pool(tmp_path, ("plain", "none"), ("packed", "zstd"))
    server = server_factory(pool)
    volumes = {"plain": "ext4", "packed": "xfs"}
    src = {name: tmp_path / f"src-{name}" for name in volumes}
    for seed, name in enumerate(volumes):
        fs.make_sample_tree(src[name] / "synced", seed=40 + seed, files=24, max_file_size=2 << 20)
        fs.make_sample_tree(src[name] / "later", seed=50 + seed, files=12, max_file_size=2 << 20)
    mnt = {name: tmp_path / f"mnt-{name}" for name in volumes}
    with attached(server.socket_path, "plain", tmp_path) as dev_plain, \
            attached(server.socket_path, "packed", tmp_path) as dev_packed:
        dev = {"plain": dev_plain, "packed": dev_packed}
        _in_parallel(*(lambda n=name: fs.mkfs(dev[n], volumes[n]) for name in volumes))
        for name in volumes:
            fs.mount(dev[name], mnt[name])
        _in_parallel(*(lambda n=name: _copy_synced(src[n] / "synced", mnt[n] / "synced") for name in volumes))
        _in_parallel(*(lambda n=name: fs.copy_tree(src[n] / "later", mnt[n] / "later") for name in volumes))
        server.kill()
    server.start()
    for name, fstype in volumes.items():
        with attached(server.socket_path, name, tmp_path) as dev:
            with fs.mounted(dev, mnt[name]):  # journal / log replay
                assert fs.compare_trees(src[name] / "synced", mnt[name] / "synced") == [], name
                assert _check_maybe_lost(src[name] / "later", mnt[name] / "later") == [], name
            check = fs.fsck(dev, fstype)
            assert check.clean, f"{name}: {check}"
    stop_cleanly(server)
    check_pool(pool)


# --- 3./4. guests booting from a volume ----------------------------------------------------------

@pytest.mark.vm
@pytest.mark.parametrize("client", ["qemu", pytest.param("uml", marks=pytest.mark.uml)])
def test_guest_boots_from_volume(client, tmp_path, server_factory, guest_images):
    """qemu (root disk = NBD export) or UML (root disk = nbdfuse file) boots from a volume and
    writes a blob; the host reads it back, also after a clean server restart; the pool checks clean."""
    pool = make_pool(tmp_path)
    server = server_factory(pool)
    rt = guest.roundtrip(server.socket_path, VOLUME, tmp_path, client=client, images=guest_images,
                         blob_kib=8192)
    if client == "qemu":
        assert rt.boot.fields["root"] == "/dev/vda:ext4"
    else:
        assert rt.boot.fields["root"].endswith(":ext4")
    stop_cleanly(server)
    check_pool(pool)
    server.start()
    again = guest.collect(server.socket_path, VOLUME, tmp_path)
    assert again.fsck.clean, str(again.fsck)
    assert again.result["marker"] == rt.token
    assert again.blob_sha256 == rt.output.blob_sha256 == rt.boot.fields["blob_sha256"]
    stop_cleanly(server)
    print(f"{client} round trip: {rt.seconds}")


# --- 5. clean stop and restart -------------------------------------------------------------------

def test_filesystem_survives_clean_restart(tmp_path, server_factory):
    """ext4 written and unmounted; `chunkvol check` beside the running server; server stopped
    with SIGTERM (exit 0), pool checked, server restarted: fsck clean, tree identical; more
    written after the restart survives a second stop too.

    The filesystem is unmounted and detached before each SIGTERM: nbdkit (1.32) does not exit
    on SIGTERM while a client is still connected (the file plugin behaves the same), so a stop
    under a mounted filesystem is a kill -9 case, covered above.
    """
    pool = make_pool(tmp_path)
    server = server_factory(pool)
    first, second = tmp_path / "src-1", tmp_path / "src-2"
    fs.make_sample_tree(first, seed=21)
    fs.make_sample_tree(second, seed=22, files=20)
    with attached(server.socket_path, VOLUME, tmp_path) as dev:
        fs.mkfs(dev, "ext4")
        with fs.mounted(dev, tmp_path / "mnt") as mnt:
            fs.copy_tree(first, mnt / "first")
    check_pool(pool)  # read-only check while the server has the pool
    stop_cleanly(server)
    before = check_pool(pool)

    server.start()
    with attached(server.socket_path, VOLUME, tmp_path) as dev:
        check = fs.fsck(dev, "ext4")
        assert check.clean, str(check)
        with fs.mounted(dev, tmp_path / "mnt") as mnt:
            assert fs.compare_trees(first, mnt / "first") == []
            fs.copy_tree(second, mnt / "second")
    stop_cleanly(server)
    after = check_pool(pool)
    assert after["records"] > before["records"]

    server.start()
    with attached(server.socket_path, VOLUME, tmp_path, readonly=True) as dev:
        check = fs.fsck(dev, "ext4")
        assert check.clean, str(check)
        with fs.mounted(dev, tmp_path / "mnt", options="ro") as mnt:
            assert fs.compare_trees(first, mnt / "first") == []
            assert fs.compare_trees(second, mnt / "second") == []
    stop_cleanly(server)


def _physical_blocks(root: Path) -> list[int]:
    """Last physical block (filesystem blocks) of every extent of every file under ROOT (filefrag)."""
    ends = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size:
            for line in _run(["filefrag", "-e", str(path)]).splitlines():
                fields = line.replace(":", " ").replace("..", " ").split()
                if len(fields) >= 6 and fields[0].isdigit():
                    ends.append(int(fields[4]))
    return ends


def test_grow_volume_under_ext4(tmp_path, server_factory):
    """`chunkvol volume resize` between two server runs: the client sees the new size, ext4
    grows into it (offline resize2fs: online growing needs CAP_SYS_RESOURCE, which test
    containers may lack), the old files stay identical, new ones land past the old end, fsck is
    clean and the pool checks clean."""
    pool = make_pool(tmp_path)
    server = server_factory(pool)
    old, new = tmp_path / "src-old", tmp_path / "src-new"
    fs.make_sample_tree(old, seed=31, files=20)
    fs.make_sample_tree(new, seed=32, files=20)
    with attached(server.socket_path, VOLUME, tmp_path) as dev:
        fs.mkfs(dev, "ext4", block_size=4096)
        with fs.mounted(dev, tmp_path / "mnt") as mnt:
            _copy_synced(old, mnt / "old")
            # Take (almost) all free space, so that files written after the resize need blocks
            # past the old end (fallocate: unwritten extents, no data through the store).
            free = os.statvfs(mnt).f_bfree * os.statvfs(mnt).f_frsize
            _run(["fallocate", "-l", str(free - (16 << 20)), str(mnt / "filler")])
    stop_cleanly(server)
    chunkvol("--pool", pool, "volume", "resize", VOLUME, "--size", "768M")

    server.start()
    with attached(server.socket_path, VOLUME, tmp_path) as dev:
        assert int(_run(["blockdev", "--getsize64", dev])) == 768 << 20
        check = fs.fsck(dev, "ext4")
        assert check.clean, str(check)
        _run(["e2fsck", "-fp", dev])  # records the check resize2fs insists on
        _run(["resize2fs", dev])
        with fs.mounted(dev, tmp_path / "mnt") as mnt:
            assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize > 700 << 20
            assert fs.compare_trees(old, mnt / "old") == []
            _copy_synced(new, mnt / "new")  # synced: extents allocated, not delayed
            assert max(_physical_blocks(mnt / "new")) * 4096 >= 384 << 20
            (mnt / "filler").unlink()
        check = fs.fsck(dev, "ext4")
        assert check.clean, str(check)
    stop_cleanly(server)
    check_pool(pool)

    server.start()
    with attached(server.socket_path, VOLUME, tmp_path, readonly=True) as dev:
        with fs.mounted(dev, tmp_path / "mnt", options="ro") as mnt:
            assert fs.compare_trees(old, mnt / "old") == []
            assert fs.compare_trees(new, mnt / "new") == []
    stop_cleanly(server)


# --- a full disk under a real filesystem ----------------------------------------------------------

@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str):
    """A tmpfs of SIZE at TMP_PATH/disk for a pool, so that a client can fill it; unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)])
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill_until_full(mnt: Path) -> subprocess.CompletedProcess:
    """Write 200 MiB of random data with fsync into the filesystem on the volume: more than the
    pool's disk holds, so it must fail (ENOSPC, or EROFS once ext4 aborted its journal)."""
    return subprocess.run(["dd", "if=/dev/urandom", f"of={mnt / 'big'}", "bs=1M", "count=200", "conv=fsync"],
                          capture_output=True, text=True)


def _fill_disk(disk: Path) -> None:
    """Take the last free bytes of DISK with a file."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError:
        pass
    finally:
        os.close(fd)


def test_full_disk_under_ext4(tmp_path, server_factory):
    """ext4 fills the disk holding the pool: the client gets an error, the server stays up;
    once space is freed (the server still running) the same volume takes writes again, the
    files synced before are identical, fsck and `chunkvol check` are clean, and everything
    survives a restart.  (chunkvol has no garbage collection: deleting files on the volume
    frees nothing in the pool, so space is freed beside it, by removing a ballast file.)"""
    first, second = tmp_path / "src-1", tmp_path / "src-2"
    fs.make_sample_tree(first, seed=61, files=20, max_file_size=2 << 20)
    fs.make_sample_tree(second, seed=62, files=10, max_file_size=1 << 20)
    with small_disk(tmp_path, "128m") as disk:
        ballast = disk / "ballast"
        ballast.write_bytes(bytes(48 << 20))
        pool = make_pool(disk)
        server = server_factory(pool)
        try:
            with attached(server.socket_path, VOLUME, tmp_path) as dev:
                fs.mkfs(dev, "ext4", block_size=4096)
                with fs.mounted(dev, tmp_path / "mnt") as mnt:
                    _copy_synced(first, mnt / "first")
                    full = _fill_until_full(mnt)
                    assert full.returncode != 0, f"200 MiB fit on a 128 MiB disk? {full.stderr}"
                    # The store refused writes because its disk is (nearly) full, not for another reason.
                    assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize < 4 << 20
            assert server.process.poll() is None, f"the server died on a full disk: {server.log()}"
            ballast.unlink()

            with attached(server.socket_path, VOLUME, tmp_path) as dev:
                # The client saw write errors: let e2fsck replay the journal and clear the error
                # state (0 = clean, 1 = corrected), then the data must be intact.
                repair = subprocess.run(["e2fsck", "-fy", dev], capture_output=True, text=True)
                assert repair.returncode in (0, 1), f"e2fsck -fy exited {repair.returncode}: {repair.stdout}"
                with fs.mounted(dev, tmp_path / "mnt") as mnt:
                    assert fs.compare_trees(first, mnt / "first") == []
                    (mnt / "big").unlink(missing_ok=True)
                    _copy_synced(second, mnt / "second")
                check = fs.fsck(dev, "ext4")
                assert check.clean, str(check)
            stop_cleanly(server)
            check_pool(pool)

            server.start()
            with attached(server.socket_path, VOLUME, tmp_path, readonly=True) as dev:
                with fs.mounted(dev, tmp_path / "mnt", options="ro") as mnt:
                    assert fs.compare_trees(first, mnt / "first") == []
                    assert fs.compare_trees(second, mnt / "second") == []
        finally:
            server.kill()  # before the disk goes away (a no-op after a clean stop)


def test_commands_on_full_disk_give_one_line_errors(tmp_path, server_factory):
    """README: a full disk gets a clear error; errors are one line on stderr, exit 7 = out of
    space.  After a real client filled the pool's disk and the server was stopped, the
    read-only commands must work or say so in one line."""
    with small_disk(tmp_path, "96m") as disk:
        pool = make_pool(disk)
        server = server_factory(pool)
        try:
            with attached(server.socket_path, VOLUME, tmp_path) as dev:
                fs.mkfs(dev, "ext4", block_size=4096)
                with fs.mounted(dev, tmp_path / "mnt") as mnt:
                    assert _fill_until_full(mnt).returncode != 0
            server.stop()
            _fill_disk(disk)
            results = {" ".join(args): chunkvol("--pool", pool, *args, check=False)
                       for args in (["status"], ["volume", "list"], ["check"])}
        finally:
            server.kill()
    bad = [f"chunkvol {name}: exit {r.returncode}, {len(r.stderr.splitlines())} stderr lines, "
           f"last: {r.stderr.strip().splitlines()[-1:]}" for name, r in results.items()
           if r.returncode not in (0, 7) or len(r.stderr.strip().splitlines()) > 1]
    assert bad == [], "\n".join(bad)
