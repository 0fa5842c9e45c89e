"""Boot user-mode-linux with an NBD export (through nbdfuse) as its root disk.

Why: UML is a second, independent kernel client.  Its ubd driver reads and
writes the nbdfuse *file* with ordinary pread/pwrite/fsync from a host
process, so the export sees yet another I/O pattern than qemu's NBD client or
the loop device.  Debian's linux.uml has ubd and ext4 built in, so it boots
the same rootfs.ext4 as qemu without any initramfs.

Headless: con0 is wired to the log file (fd 1), every other console and
serial line to null; no xterms are spawned.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import _proc
from .nbdfuse import fuse_file
from .vm import BootResult, run_guest

UML_BINARY = "linux.uml"


def uml_argv(disk: str | os.PathLike, *, mem: str = "256M", append: str = "") -> list[str]:
    """The linux.uml command line for booting DISK (an ext4 image file) as root."""
    disk = os.path.abspath(disk)
    if "," in disk or ":" in disk:
        raise ValueError(f"ubd cannot take a path with ',' or ':': {disk}")
    argv = [_proc.which(UML_BINARY), f"mem={mem}", f"ubd0={disk}", "root=/dev/ubda", "rootfstype=ext4",
            "rw", "init=/sbin/init", "con=null", "ssl=null", "con0=null,fd:1", "quiet", "panic=-1"]
    return argv + (append.split() if append else [])


def boot_uml(disk: str | os.PathLike, workdir: str | os.PathLike, *, timeout: float = 120,
             mem: str = "256M", append: str = "") -> BootResult:
    """Boot UML from the image file DISK; return what happened (call .check() to assert).

    The console (kernel messages and the guest's result line) goes to
    WORKDIR/uml-console.log.  UML keeps its guest RAM in a file under
    $TMPDIR (default /tmp), which must allow exec mappings.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "uml-console.log"
    log.unlink(missing_ok=True)
    return run_guest(uml_argv(disk, mem=mem, append=append), log, timeout=timeout, output_log=log)


def boot_uml_export(socket: str | os.PathLike, export: str, workdir: str | os.PathLike,
                    **kwargs) -> BootResult:
    """Expose EXPORT with nbdfuse and boot UML from that file; nbdfuse is stopped afterwards."""
    with fuse_file(socket, export, workdir) as disk:
        return boot_uml(disk, workdir, **kwargs)
