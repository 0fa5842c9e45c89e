"""Turn an NBD export into a loop block device: nbdfuse -> FUSE file -> losetup.

Why: this machine has no kernel nbd module, so the only way to put a real
kernel filesystem (ext4, xfs) on an export is to expose the export as a file
with nbdfuse and attach that file to a loop device.  Everything the kernel then
does (mkfs, mount, fsck, page-cache writeback, flushes) reaches the NBD server
as ordinary NBD requests, which is exactly what the store must survive.

Teardown is the fragile part, so it is done in strict reverse order and each
step tolerates the previous one having failed: unmount filesystems that sit on
the loop device, detach the loop device, unmount FUSE (fusermount3 -u, then
umount -l), then stop nbdfuse by PID.  A test that fails half-way still leaves
no mount, loop device or process behind.

Loop direct I/O: both --direct-io=on and off work over nbdfuse here (measured:
300 MiB cp+sync ~0.6 s either way, mkfs/fsck identical).  The default is on,
because then the loop device does not keep a second page cache of the FUSE
file: a completed write has been handed to nbdfuse, and a read really asks the
server, which is what a test of the store wants.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from . import _proc

_counter = itertools.count()


def nbd_uri(socket: str | os.PathLike, export: str = "") -> str:
    """The NBD URI for EXPORT on a Unix socket (export name and path percent-encoded)."""
    sock = os.path.abspath(os.fspath(socket))
    return f"nbd+unix:///{quote(export, safe='')}?socket={quote(sock, safe='/')}"


def _is_mountpoint(path: Path) -> bool:
    # No path.resolve()/exists(): on a dead FUSE mount they raise ENOTCONN.
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    return (field.replace("\\040", " ").replace("\\011", "\t")
            .replace("\\012", "\n").replace("\\134", "\\"))


def unmount_fuse(mountpoint: str | os.PathLike) -> None:
    """Unmount a FUSE mount: fusermount3 -u, retried while busy, then umount -l."""
    mountpoint = Path(mountpoint)
    for attempt in range(40):
        if not _is_mountpoint(mountpoint):
            return
        if _proc.run(["fusermount3", "-u", "-q", mountpoint], check=False).returncode == 0:
            return
        time.sleep(0.05 * min(attempt + 1, 5))  # usually "busy" for a moment after losetup -d
    if _is_mountpoint(mountpoint):
        _proc.run(["umount", "-l", mountpoint], check=False)


@contextlib.contextmanager
def fuse_file(socket: str | os.PathLike, export: str, workdir: str | os.PathLike, *,
              readonly: bool = False, connections: int | None = None,
              ready_timeout: float = 60) -> Iterator[Path]:
    """Expose EXPORT as a regular file via nbdfuse; yield the file's path.

    The file is WORKDIR/nbdfuse-N/disk.  Use this directly for clients that
    want a file (user-mode-linux ubd, qemu-img, dd); use `attached` for a block
    device.  nbdfuse's log is WORKDIR/nbdfuse-N.log.
    """
    workdir = Path(workdir).resolve()
    n = next(_counter)
    while (workdir / f"nbdfuse-{n}").exists():
        n = next(_counter)
    mnt = workdir / f"nbdfuse-{n}"
    mnt.mkdir(parents=True)
    disk = mnt / "disk"
    pidfile = workdir / f"nbdfuse-{n}.pid"
    log = workdir / f"nbdfuse-{n}.log"
    argv = [_proc.which("nbdfuse"), "-P", str(pidfile)]
    if readonly:
        argv.append("-r")
    if connections is not None:
        argv += ["-C", str(connections)]
    argv += [str(disk), nbd_uri(socket, export)]
    with open(log, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                env=_proc.system_env())
    try:
        def dead() -> str | None:
            if proc.poll() is not None:
                return f"nbdfuse exited {proc.returncode}: {_proc.read_tail(log)}"
            return None

        def ready() -> bool:
            return pidfile.exists() and pidfile.read_text().strip() != "" and disk.exists()
        _proc.wait_for(ready, timeout=ready_timeout, what=f"nbdfuse file {disk}", alive=dead)
        yield disk
    finally:
        unmount_fuse(mnt)
        try:
            proc.wait(timeout=10)  # exits by itself once unmounted
        except subprocess.TimeoutExpired:
            pass
        _proc.stop_process(proc, grace=5)
        pidfile.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def mounts_of_device(dev: str | os.PathLike) -> list[str]:
    """Mount points whose source is block device DEV (matched by major:minor), deepest first."""
    rdev = os.stat(dev).st_rdev
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == want:
                points.append(_unescape(fields[4]))
    return sorted(points, key=len, reverse=True)


def unmount_device(dev: str | os.PathLike) -> None:
    """Unmount every filesystem mounted from DEV (lazily if a plain umount fails)."""
    for point in mounts_of_device(dev):
        if _proc.run(["umount", point], check=False).returncode != 0:
            _proc.run(["umount", "-l", point], check=False)


def _loop_backing(dev: str) -> str | None:
    path = Path("/sys/block") / Path(dev).name / "loop" / "backing_file"
    try:
        return path.read_text().strip()
    except OSError:
        return None


@contextlib.contextmanager
def loop_device(path: str | os.PathLike, *, direct_io: bool = True, readonly: bool = False,
                detach_timeout: float = 30) -> Iterator[str]:
    """Attach file PATH to a free loop device; yield e.g. "/dev/loop3".

    On exit, filesystems mounted from the device are unmounted, the device is
    detached, and we wait until the kernel really released it (so the FUSE
    file underneath is no longer busy).
    """
    argv = ["losetup", "-f", "--show", f"--direct-io={'on' if direct_io else 'off'}"]
    if readonly:
        argv.append("-r")
    dev = _proc.run([*argv, os.fspath(path)]).stdout.strip()
    ours = _loop_backing(dev) or os.path.abspath(path)
    try:
        yield dev
    finally:
        with contextlib.suppress(OSError):
            unmount_device(dev)
        _proc.run(["losetup", "-d", dev], check=False)
        # losetup -d on a still-open device only sets autoclear; wait for the real
        # detach.  Compare the backing file: another process may reuse the number at once.
        with contextlib.suppress(TimeoutError):
            _proc.wait_for(lambda: _loop_backing(dev) != ours, timeout=detach_timeout,
                           what=f"{dev} to detach")


@contextlib.contextmanager
def attached(socket: str | os.PathLike, export: str, workdir: str | os.PathLike, *,
             direct_io: bool = True, readonly: bool = False,
             connections: int | None = None) -> Iterator[str]:
    """EXPORT on SOCKET as a loop block device for the `with` block; yield its path.

        with attached(sock, "vol0", tmp) as dev:
            fs.mkfs(dev, "ext4")
            with fs.mounted(dev, tmp / "mnt"):
                ...

    Everything is torn down on exit, also on exceptions: mounts on the device,
    the loop device, the FUSE mount and the nbdfuse process.
    """
    with fuse_file(socket, export, workdir, readonly=readonly, connections=connections) as disk:
        with loop_device(disk, direct_io=direct_io, readonly=readonly) as dev:
            yield dev
