"""Filesystem chores on a block device: mkfs, mount, fsck, copy and compare trees.

Why: a store test's verdict is "the kernel's filesystem on top of the export
is intact and holds exactly the bytes we wrote".  These helpers make that
verdict explicit: fsck returns a result object instead of an exit code to
interpret, and trees are compared file by file by SHA-256 with a readable list
of differences, so a failing test says *which* file went wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import shutil
import stat
from pathlib import Path
from typing import Iterator

from . import _proc

FSTYPES = ("ext4", "xfs")


def mkfs(dev: str, fstype: str = "ext4", *, label: str | None = None, block_size: int | None = None) -> None:
    """Make a fresh FSTYPE (ext4 or xfs) filesystem on DEV, overwriting whatever is there.

    BLOCK_SIZE (bytes) overrides mkfs's choice.  Note that mke2fs picks 1 KiB blocks for
    filesystems below 512 MiB, so every ext4 write to such a device is 1 KiB-granular.
    """
    if fstype == "ext4":
        argv = (["mkfs.ext4", "-q", "-F"] + (["-L", label] if label else [])
                + (["-b", str(block_size)] if block_size else []) + [dev])
    elif fstype == "xfs":
        argv = (["mkfs.xfs", "-q", "-f"] + (["-L", label] if label else [])
                + (["-b", f"size={block_size}"] if block_size else []) + [dev])
    else:
        raise ValueError(f"unsupported fstype {fstype!r}; expected one of {FSTYPES}")
    _proc.run(argv)


def detect_fstype(dev: str) -> str | None:
    """The filesystem type blkid sees on DEV (e.g. "ext4"), or None if none."""
    proc = _proc.run(["blkid", "-p", "-o", "value", "-s", "TYPE", dev], check=False)
    return proc.stdout.strip() or None


def mount(dev: str, mountpoint: str | os.PathLike, *, fstype: str | None = None,
          options: str | None = None) -> None:
    """Mount DEV on MOUNTPOINT (created if missing)."""
    Path(mountpoint).mkdir(parents=True, exist_ok=True)
    argv = ["mount"]
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", options]
    _proc.run([*argv, dev, os.fspath(mountpoint)])


def umount(mountpoint: str | os.PathLike) -> None:
    """Unmount MOUNTPOINT (flushes the filesystem); lazy unmount if it is busy."""
    if _proc.run(["umount", os.fspath(mountpoint)], check=False).returncode != 0:
        _proc.run(["umount", "-l", os.fspath(mountpoint)])


@contextlib.contextmanager
def mounted(dev: str, mountpoint: str | os.PathLike, *, fstype: str | None = None,
            options: str | None = None) -> Iterator[Path]:
    """Mount DEV for the `with` block and always unmount it afterwards."""
    mount(dev, mountpoint, fstype=fstype, options=options)
    try:
        yield Path(mountpoint)
    finally:
        umount(mountpoint)


@dataclasses.dataclass
class FsckResult:
    """Outcome of a read-only filesystem check.  `clean` is the verdict; the rest explains it."""
    clean: bool
    fstype: str
    returncode: int
    command: str
    output: str

    def __str__(self) -> str:
        verdict = "clean" if self.clean else "NOT CLEAN"
        return f"{self.fstype} {verdict} ({self.command} exited {self.returncode})\n{self.output}"


def fsck(dev: str, fstype: str | None = None) -> FsckResult:
    """Check the (unmounted) filesystem on DEV without changing it.

    ext4: `e2fsck -fn` (0 = clean; 4 = errors found).  xfs: `xfs_repair -n`
    (0 = clean; 1 = corruption; 2 = dirty log, i.e. not cleanly unmounted).
    """
    fstype = fstype or detect_fstype(dev)
    if fstype in ("ext2", "ext3", "ext4"):
        argv = ["e2fsck", "-fn", dev]
    elif fstype == "xfs":
        argv = ["xfs_repair", "-n", dev]
    else:
        raise ValueError(f"cannot fsck {dev}: filesystem type {fstype!r}")
    proc = _proc.run(argv, check=False)
    return FsckResult(clean=proc.returncode == 0, fstype=fstype, returncode=proc.returncode,
                      command=" ".join(argv[:-1]), output=(proc.stdout + proc.stderr).strip())


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tree SRC into directory DST (merged), keeping symlinks as symlinks."""
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: str | os.PathLike, *, ignore: tuple[str, ...] = ("lost+found",)) -> dict[str, str]:
    """Map each path under ROOT (relative) to a description of its content.

    Files: "file <size> <sha256>"; symlinks: "link <target>"; directories: "dir".
    Top-level names in IGNORE (mkfs's lost+found) are skipped.
    """
    root = os.fspath(root)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in ignore]
            filenames = [f for f in filenames if f not in ignore]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"link {os.readlink(full)}"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = f"file {st.st_size} {_sha256(full)}"
            else:
                out[rel] = f"special {stat.S_IFMT(st.st_mode):o}"
    return out


def compare_trees(expected: str | os.PathLike, actual: str | os.PathLike) -> list[str]:
    """Differences between two trees, one line each; an empty list means identical."""
    a, b = tree_digest(expected), tree_digest(actual)
    diffs = [f"missing: {p}" for p in sorted(a.keys() - b.keys())]
    diffs += [f"unexpected: {p}" for p in sorted(b.keys() - a.keys())]
    diffs += [f"differs: {p}: expected {a[p]}, got {b[p]}" for p in sorted(a.keys() & b.keys()) if a[p] != b[p]]
    return diffs


def make_sample_tree(root: str | os.PathLike, *, seed: int = 0, files: int = 40,
                     max_file_size: int = 3 << 20) -> int:
    """Fill ROOT with a deterministic mix of files; return the bytes written.

    Why this mix: it hits the store's interesting paths -- tiny files, files
    that are not block-aligned, large random (incompressible) files, runs of
    zeros (compressible / sparse candidates), repeated blocks (dedup
    candidates), nested directories and symlinks.
    """
    rng = random.Random(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    block = rng.randbytes(4096)
    total = 0
    for i in range(files):
        d = root / f"d{i % 5}" / f"sub{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        kind = i % 5
        size = rng.randrange(0, max_file_size) if kind != 0 else rng.randrange(0, 200)
        if kind == 2:
            data = bytes(size)
        elif kind == 3:
            data = (block * (size // 4096 + 1))[:size]
        else:
            data = rng.randbytes(size)
        (d / f"f{i}.bin").write_bytes(data)
        total += size
    (root / "d0" / "link-to-f1").symlink_to("sub1/f1.bin")
    (root / "empty-dir").mkdir(exist_ok=True)
    return total
