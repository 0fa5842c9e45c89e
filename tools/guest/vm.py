"""Boot qemu (TCG) with the Debian kernel and an NBD export as its virtio root disk.

Why: a booting Linux is the most demanding ordinary client a block device
has -- the kernel's own virtio-blk driver, ext4 journal, flushes and
barriers, through qemu's NBD client.  The export is attached with
`-blockdev` JSON (driver nbd, unix socket, export name) rather than a
`-drive file=nbd+unix://...` URI, so export names and socket paths need no
escaping.  qemu talks to the server directly; no nbdfuse is involved.

Speed (TCG, no KVM): the kernel is booted as an uncompressed PVH ELF when
build_initramfs could extract one, and with qboot instead of SeaBIOS when
installed; that takes a boot from ~6.8 s to ~3.5 s on this machine.

The guest side is build_initramfs.GUEST_INIT: it prints one
"CHUNKVOL-GUEST-RESULT: OK key=value ..." (or "... FAIL reason") line on the
serial console and powers off; `BootResult` parses it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from . import _proc
from .build_initramfs import RESULT_PREFIX, GuestImages, NbdGuestImages, guest_images

QBOOT = Path("/usr/share/qemu/qboot.rom")


@dataclasses.dataclass
class BootResult:
    """What one guest boot did.  `ok` is the verdict; `fields` holds the guest's key=value report."""
    returncode: int | None
    timed_out: bool
    seconds: float
    log: Path
    result_line: str | None

    @property
    def ok(self) -> bool:
        return (not self.timed_out and self.result_line is not None
                and self.result_line.split()[:1] == ["OK"])

    @property
    def fields(self) -> dict[str, str]:
        if not self.result_line:
            return {}
        return dict(kv.split("=", 1) for kv in self.result_line.split()[1:] if "=" in kv)

    @property
    def stderr_log(self) -> Path:
        """The guest process's own stdout/stderr (qemu errors, UML host-side messages)."""
        return self.log.with_suffix(".stderr")

    def check(self) -> "BootResult":
        """Raise GuestError (with the console tail) unless the guest reported OK."""
        if not self.ok:
            why = "timed out" if self.timed_out else f"exited {self.returncode}"
            raise GuestError(f"guest {why} after {self.seconds:.1f}s, result line: {self.result_line!r}\n"
                             f"--- {self.log} (tail) ---\n{_proc.read_tail(self.log)}\n"
                             f"--- {self.stderr_log} (tail) ---\n{_proc.read_tail(self.stderr_log)}")
        return self


class GuestError(RuntimeError):
    """The guest did not boot, did not report, or reported FAIL."""


def parse_result_line(log: Path) -> str | None:
    """The text after the last CHUNKVOL-GUEST-RESULT: marker in a console log."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return None
    lines = [ln.split(RESULT_PREFIX, 1)[1].strip() for ln in text.splitlines() if RESULT_PREFIX in ln]
    return lines[-1] if lines else None


def run_guest(argv: Sequence[str], console_log: Path, *, timeout: float,
              output_log: Path | None = None) -> BootResult:
    """Run a guest process to completion (or kill it at TIMEOUT); parse its console log.

    Shared by qemu and user-mode-linux.  The process gets its own session so
    that a killed UML (which forks helper processes) can be reaped as a
    group; we only ever signal that group, which we created.  The process's
    stdout/stderr go to OUTPUT_LOG (default: CONSOLE_LOG with suffix .stderr).
    """
    started = time.monotonic()
    with open(output_log or console_log.with_suffix(".stderr"), "ab") as err:
        proc = subprocess.Popen(list(map(str, argv)), stdin=subprocess.DEVNULL, stdout=err,
                                stderr=subprocess.STDOUT, env=_proc.system_env(), start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            kill_group(proc)
    return BootResult(returncode=proc.returncode, timed_out=timed_out,
                      seconds=time.monotonic() - started, log=console_log,
                      result_line=parse_result_line(console_log))


def kill_group(proc: subprocess.Popen) -> None:
    """Stop a guest started with start_new_session=True: SIGTERM to its process group (which
    it leads, by its PID), SIGKILL if it lingers; reaped."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def qemu_argv(socket: str | os.PathLike, export: str, images: GuestImages, console_log: Path, *,
              memory_mib: int = 512, append: str = "", discard: bool = True,
              fast_boot: bool = True) -> list[str]:
    """The qemu-system-x86_64 command line (exposed so tests can show or tweak it)."""
    blockdev = {
        "driver": "raw", "node-name": "root", "discard": "unmap" if discard else "ignore",
        "file": {"driver": "nbd", "server": {"type": "unix", "path": os.path.abspath(socket)},
                 "export": export},
    }
    argv = qemu_base_argv(images, console_log, memory_mib=memory_mib,
                          append=f"root=/dev/vda rootfstype=ext4 {append}", fast_boot=fast_boot)
    return argv + ["-blockdev", json.dumps(blockdev),
                   "-device", "virtio-blk-pci,drive=root,serial=chunkvol-root"]


def qemu_base_argv(images: GuestImages | NbdGuestImages, console_log: Path, *, memory_mib: int = 512,
                   append: str = "", fast_boot: bool = True) -> list[str]:
    """qemu-system-x86_64 (TCG, one CPU, no default devices, no reboot) booting the images'
    kernel and initramfs, with the console (ttyS0) written to CONSOLE_LOG.  Callers add their
    devices; a further -serial option becomes ttyS1."""
    kernel = images.vmlinux if (fast_boot and images.vmlinux) else images.kernel.vmlinuz
    argv = [_proc.which("qemu-system-x86_64"),
            "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "1", "-m", str(memory_mib),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-monitor", "none", "-serial", f"file:{console_log}",
            "-kernel", str(kernel), "-initrd", str(images.initramfs),
            "-append", " ".join(f"console=ttyS0 quiet panic=-1 {append}".split())]
    if fast_boot and QBOOT.exists():
        argv += ["-bios", str(QBOOT)]
    return argv


def boot_qemu(socket: str | os.PathLike, export: str, workdir: str | os.PathLike, *,
              images: GuestImages | None = None, timeout: float = 120, memory_mib: int = 512,
              append: str = "", fast_boot: bool = True) -> BootResult:
    """Boot the guest with EXPORT on SOCKET as /dev/vda (its root fs); return what happened.

    The export must already hold the guest root filesystem with a marker
    (see guest.prepare_root).  The console goes to WORKDIR/qemu-console.log,
    qemu's own messages to WORKDIR/qemu-console.stderr.  Does not raise on
    guest failure: call .check() on the result.
    """
    images = images or guest_images()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "qemu-console.log"
    log.unlink(missing_ok=True)
    argv = qemu_argv(socket, export, images, log, memory_mib=memory_mib, append=append, fast_boot=fast_boot)
    return run_guest(argv, log, timeout=timeout)
