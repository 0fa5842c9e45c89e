"""Boot user-mode Linux with an NBD export (through nbdfuse) as its root disk.

Why: UML is a second, independent kernel client.  Its ubd driver reads and
writes the nbdfuse *file* with ordinary pread/pwrite/fsync from a host
process, so the export sees yet another I/O pattern than qemu's NBD client or
the loop device.  The kernel has ubd and ext4 built in, so it boots the same
rootfs.ext4 as qemu without any initramfs.

Which kernel: the one tools/guest/uml_kernel.py builds once (Debian's 6.12
source, our patch, a minimal config), not Debian's `linux.uml`, so every host
runs the same UML.  bookworm's linux.uml (6.1) panics on hosts whose XSAVE
area is larger than its fixed FP buffer, i.e. Intel CPUs with AMX: it calls
PTRACE_SETREGSET(NT_X86_XSTATE) with a fixed 2696 bytes and the host's
xstateregs_set() returns EFAULT unless the length is the host's full XSAVE
size (11008 bytes with AMX), so the console shows
"userspace - ptrace set fp regs failed, errno = 14" and "Kernel panic - not
syncing: Attempted to kill init!".  Our patch measures the host's size at boot
and transfers the full state (see uml_kernel.py and uml/xstate-size.patch).

Headless: con0 is wired to the log file (fd 1), every other console and
serial line to null; no xterms are spawned.

`unusable_reason()` boots the kernel once per process and says, in UML's own
words, why it cannot run on this host (e.g. ptrace not permitted), or None;
tests skip on that and only on that.  A kernel that does not build, or a boot
that fails for any other reason, raises.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path

from . import build_initramfs, uml_kernel
from .nbdfuse import fuse_file
from .vm import BootResult, GuestError, run_guest


def uml_binary() -> Path:
    """The built user-mode Linux (built now, loudly, if it is not cached yet)."""
    return uml_kernel.uml_kernel()


def uml_argv(disk: str | os.PathLike, *, mem: str = "256M", append: str = "",
             readonly: bool = False, quiet: bool = True) -> list[str]:
    """The UML command line for booting DISK (an ext4 image file) as root.

    READONLY opens the image read-only (ubd0r=, root mounted ro); QUIET=False
    keeps UML's start-up checks ("Checking that ptrace can change system call
    numbers...OK", "Host FP state: XSAVE, 11008 bytes") on the console.
    """
    disk = os.path.abspath(disk)
    if "," in disk or ":" in disk:
        raise ValueError(f"ubd cannot take a path with ',' or ':': {disk}")
    argv = [str(uml_binary()), f"mem={mem}", f"ubd0{'r' if readonly else ''}={disk}", "root=/dev/ubda",
            "rootfstype=ext4", "ro" if readonly else "rw", "init=/sbin/init", "con=null", "ssl=null",
            "con0=null,fd:1"] + (["quiet"] if quiet else []) + ["panic=-1"]
    return argv + (append.split() if append else [])


def boot_uml(disk: str | os.PathLike, workdir: str | os.PathLike, *, timeout: float = 120,
             mem: str = "256M", append: str = "", readonly: bool = False,
             quiet: bool = True) -> BootResult:
    """Boot UML from the image file DISK; return what happened (call .check() to assert).

    The console (kernel messages and the guest's result line) goes to
    WORKDIR/uml-console.log.  UML keeps its guest RAM in a file under
    $TMPDIR (default /tmp), which must allow exec mappings.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "uml-console.log"
    log.unlink(missing_ok=True)
    argv = uml_argv(disk, mem=mem, append=append, readonly=readonly, quiet=quiet)
    return run_guest(argv, log, timeout=timeout, output_log=log)


def boot_uml_export(socket: str | os.PathLike, export: str, workdir: str | os.PathLike,
                    **kwargs) -> BootResult:
    """Expose EXPORT with nbdfuse and boot UML from that file; nbdfuse is stopped afterwards."""
    with fuse_file(socket, export, workdir) as disk:
        return boot_uml(disk, workdir, **kwargs)


# Console lines by which UML says the host cannot run it (as opposed to a bug in
# the kernel or the guest, which must not turn into a skip).
_HOST_PROBLEMS = (
    # "ptrace: Operation not permitted", "userspace - ptrace set fp regs failed, errno = 14"
    re.compile(r"ptrace.*(failed|not permitted)", re.IGNORECASE),
    re.compile(r"^check_\w+ ?:.*"),  # UML's start-up checks (os-Linux/start_up.c)
    re.compile(r"must be not mounted noexec|Failed to choose tempdir|Couldn't allocate"),
    re.compile(r"Host XSAVE area is .* not supported"),
)


def host_problem(console: str) -> str | None:
    """The first console line saying the host cannot run UML, verbatim, or None."""
    lines = [ln.strip() for ln in console.splitlines() if ln.strip()]
    for pattern in _HOST_PROBLEMS:
        for line in lines:
            if pattern.search(line):
                if "ptrace" in line.lower() and "not permitted" in line.lower():
                    return f"ptrace is not permitted: {line}"
                return line
    return None


@functools.lru_cache(maxsize=None)
def unusable_reason(timeout: float = 60) -> str | None:
    """None if the built UML boots on this host; else why not, as UML's console says it.

    Boots the guest root filesystem (build_initramfs) read-only, without
    `quiet`: reaching the guest's /sbin/init (any CHUNKVOL-GUEST-RESULT line,
    here "FAIL cannot remount / rw") proves UML runs here, including the
    ptrace FP-register round trip on every switch to user space.  Costs well
    under a second; the answer is cached per process.  Raises UmlBuildError
    if the kernel does not build and GuestError if the boot fails for a reason
    that is not a recognised host limitation.
    """
    kernel = uml_binary()
    rootfs = build_initramfs.guest_images().rootfs
    with tempfile.TemporaryDirectory(prefix="chunkvol-uml-probe-") as tmp:
        result = boot_uml(rootfs, tmp, timeout=timeout, readonly=True, quiet=False)
        console = result.log.read_text(errors="replace") if result.log.exists() else ""
    if result.result_line is not None:
        return None
    reason = host_problem(console)
    if reason is not None:
        return reason
    why = "timed out" if result.timed_out else f"exited {result.returncode}"
    raise GuestError(f"{kernel} {why} after {result.seconds:.1f}s without reaching the guest's init, "
                     f"and the console names no host limitation; console tail:\n{console[-4000:]}")
