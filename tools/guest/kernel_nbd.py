"""The kernel's own NBD client (nbd-client + nbd.ko) in a qemu guest, against an export here.

Why: `nbd-client HOST PORT /dev/nbd0 -N EXPORT` is the client users name first, and the host
may lack the nbd module (this one does).  The Debian guest kernel has it, so the client runs in
a qemu (TCG) guest booted from build_initramfs.nbd_guest_images(): an initramfs that is the
whole system (busybox, nbd-client, mke2fs, e2fsck; no root disk).

How the guest reaches the export with no real network address anywhere: qemu's user network
with restrict=on (the guest can reach nothing outside) and one guestfwd rule.  A TCP connection
from the guest to GUEST_HOST:GUEST_PORT (10.0.2.100:10809, inside qemu's private network) makes
qemu start `socat - UNIX-CONNECT:SOCKET` with that connection as its stdin/stdout: one socat per
connection, so the guest can connect again after the server restarted, and socat's retry and
interval options make a connection made while the server is down wait for it (up to
`reconnect_wait` seconds).

Control: the guest's second serial port (ttyS1) is a Unix socket qemu listens on.  Each line
the host writes is one shell command for the guest's /init (build_initramfs.NBD_GUEST_INIT),
which runs it and answers with its output and exit code (`NbdGuest.run`).  The console (ttyS0)
goes to WORKDIR/console.log: kernel messages plus a copy of every command, its output and "END
n rc=N" line, and the guest's result line.

Processes: qemu runs in a session of its own and is stopped by its PID (process group).  qemu
spawns each socat through glib (which may double-fork, so they need not be its children): each
one writes its PID to WORKDIR/socat.pids before exec'ing socat, and `close()` waits for those
still running (they exit once their connection closes) and stops any left, by PID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket as socketlib
import subprocess
import time
from pathlib import Path
from typing import Iterator

from . import _proc
from .build_initramfs import NBD_STEP_PREFIX, NbdGuestImages, nbd_guest_images
from .vm import GuestError, kill_group, parse_result_line, qemu_base_argv

GUEST_HOST = "10.0.2.100"   # the forwarded address the guest connects to (qemu user network)
GUEST_PORT = 10809
DEVICE = "/dev/nbd0"


@dataclasses.dataclass
class CommandResult:
    """One command the guest ran: its exit code and combined stdout/stderr."""
    seq: int
    command: str
    returncode: int
    output: str
    seconds: float

    @property
    def fields(self) -> dict[str, str]:
        """key=value words of the output's last line (the scenario helpers report that way)."""
        lines = self.output.strip().splitlines()
        return dict(w.split("=", 1) for w in (lines[-1].split() if lines else []) if "=" in w)


def forward_command(socket: str | os.PathLike, pidfile: Path, log: Path, *, reconnect_wait: float) -> str:
    """The shell command qemu runs per guest connection: record its PID, then relay the
    connection (stdin/stdout) to the Unix socket, retrying every 0.1 s while it is absent."""
    retries = max(1, int(reconnect_wait / 0.1))
    return (f"sh -c 'echo $$ >>{pidfile}; exec socat - UNIX-CONNECT:{os.path.abspath(socket)},"
            f"retry={retries},interval=0.1 2>>{log}'")


def qemu_argv(socket: str | os.PathLike, images: NbdGuestImages, workdir: Path, *, memory_mib: int = 512,
              reconnect_wait: float = 120, append: str = "", fast_boot: bool = True) -> list[str]:
    """The qemu command line: console to WORKDIR/console.log, ttyS1 = WORKDIR/control.sock,
    a virtio NIC on a restricted user network whose only way out is the guestfwd to SOCKET."""
    paths = [os.path.abspath(socket), str(workdir)]
    if any(c in p for p in paths for c in ",'\" "):
        raise ValueError(f"qemu's -netdev and the forward command cannot take these paths: {paths}")
    if len(str(workdir / "control.sock")) > 100:  # AF_UNIX paths are limited to 107 bytes
        raise ValueError(f"workdir too long for a Unix socket in it: {workdir}")
    fwd = forward_command(socket, workdir / "socat.pids", workdir / "socat.log", reconnect_wait=reconnect_wait)
    netdev = (f"user,id=net0,restrict=on,ipv6=off,"
              f"guestfwd=tcp:{GUEST_HOST}:{GUEST_PORT}-cmd:{fwd.replace(',', ',,')}")
    return qemu_base_argv(images, workdir / "console.log", memory_mib=memory_mib, append=append,
                          fast_boot=fast_boot) + [
        "-serial", f"unix:{workdir / 'control.sock'},server=on,wait=off",
        "-netdev", netdev,
        "-device", "virtio-net-pci,netdev=net0,romfile="]


class NbdGuest:
    """A running NBD guest: `run()` commands in it, `poweroff()`, `close()` (always)."""

    def __init__(self, argv: list[str], workdir: Path, *, boot_timeout: float):
        self.workdir = workdir
        self.console_log = workdir / "console.log"
        self.socat_pids = workdir / "socat.pids"
        self._seq = 0
        self._buffer = b""
        self._control: socketlib.socket | None = None
        self.started = time.monotonic()
        with open(workdir / "qemu.stderr", "ab") as err:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                            env=_proc.system_env(), start_new_session=True)
        try:
            _proc.wait_for(self._connect, timeout=60, what="qemu's control socket", alive=self._dead)
            ready = f"{NBD_STEP_PREFIX} READY"
            _proc.wait_for(lambda: ready in self.console(), timeout=boot_timeout,
                           what="the guest's READY line", interval=0.1, alive=self._dead)
            self.boot_seconds = time.monotonic() - self.started
        except BaseException:
            self.close()
            raise

    def _connect(self) -> bool:
        """Connect to the control socket once qemu listens on it."""
        control = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        try:
            control.connect(str(self.workdir / "control.sock"))
        except (FileNotFoundError, ConnectionRefusedError):
            control.close()
            return False
        self._control = control
        return True

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def console_mark(self) -> int:
        """Where the console log ends now: pass it as `since` to wait_console()."""
        return len(self.console())

    def wait_console(self, text: str, *, since: int = 0, timeout: float = 120) -> None:
        """Wait until TEXT appears on the console after offset SINCE (the deadline only stops a
        hang); e.g. a kernel message the next step depends on."""
        _proc.wait_for(lambda: text in self.console()[since:], timeout=timeout, interval=0.05,
                       what=f"{text!r} on the guest console", alive=self._dead)

    def result_line(self) -> str | None:
        """The text after the guest's last CHUNKVOL-GUEST-RESULT: marker on the console."""
        return parse_result_line(self.console_log)

    def _dead(self) -> str | None:
        if self.process.poll() is not None:
            return f"qemu exited {self.process.returncode}; {self._tails()}"
        return None

    def _tails(self) -> str:
        return (f"\n--- {self.console_log} (tail) ---\n{_proc.read_tail(self.console_log)}"
                f"\n--- qemu.stderr (tail) ---\n{_proc.read_tail(self.workdir / 'qemu.stderr')}")

    def _read_line(self, deadline: float, what: str) -> str:
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"gave up waiting for {what}{self._tails()}")
            readable, _, _ = select.select([self._control], [], [], min(left, 1.0))
            if readable:
                data = self._control.recv(65536)
                if not data:
                    raise GuestError(f"control channel closed while waiting for {what}; {self._dead() or ''}"
                                     f"{self._tails()}")
                self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def run(self, command: str, *, timeout: float = 300, check: bool = True) -> CommandResult:
        """Run COMMAND (one line of shell, the guest's /init functions included) in the guest;
        wait for it (TIMEOUT only stops a hang).  With CHECK, a non-zero exit raises GuestError."""
        if "\n" in command:
            raise ValueError("one line per command")
        self._seq += 1
        seq, started = self._seq, time.monotonic()
        self._control.sendall(f"{seq} {command}\n".encode())
        output = []
        while True:
            line = self._read_line(started + timeout, f"guest command {seq}: {command}")
            if line.startswith("| "):
                output.append(line[2:])
            elif line.startswith(f"END {seq} "):
                result = CommandResult(seq, command, int(line.split()[2]), "\n".join(output),
                                       time.monotonic() - started)
                break
        if check and result.returncode != 0:
            raise GuestError(f"guest command {command!r} exited {result.returncode}:\n{result.output}"
                             f"{self._tails()}")
        return result

    def poweroff(self, timeout: float = 120) -> int:
        """Power the guest off (after sync); wait for qemu to exit; its exit code."""
        self._control.sendall(f"{self._seq + 1} sync; poweroff -f\n".encode())
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the guest did not power off in {timeout:.0f}s{self._tails()}") from None

    def close(self) -> None:
        """Stop qemu (by PID) unless it exited, then every socat it started that is still running."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.process.poll() is None:
            kill_group(self.process)
        _stop_forwarders(self.socat_pids)


def _pid_state(pid: int) -> str | None:
    """The process's state letter from /proc (None if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def _is_forwarder(pid: int, pidfile: Path) -> bool:
    """PID still runs one of our forwarders (socat, or the sh about to exec it), not a program
    that reused the PID."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    program = os.path.basename(cmdline.split(b"\0")[0])
    ours = program == b"socat" or (program == b"sh" and os.fsencode(pidfile) in cmdline)
    return ours and _pid_state(pid) not in (None, "Z")


def _stop_forwarders(pidfile: Path, grace: float = 5) -> None:
    """Wait up to GRACE s for the recorded socat processes to end (each does once its guest
    connection closed), then SIGTERM and SIGKILL the rest, each by its PID."""
    try:
        pids = [int(p) for p in pidfile.read_text().split()]
    except FileNotFoundError:
        return
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in pids if _is_forwarder(pid, pidfile)]
        if not alive:
            return
        for pid in alive if sig is not None else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_is_forwarder(pid, pidfile) for pid in alive):
            time.sleep(0.05)
    left = [pid for pid in pids if _is_forwarder(pid, pidfile)]
    if left:
        raise RuntimeError(f"socat processes {left} did not stop")


@contextlib.contextmanager
def booted(socket: str | os.PathLike, workdir: str | os.PathLike, *, images: NbdGuestImages | None = None,
           memory_mib: int = 512, reconnect_wait: float = 120, boot_timeout: float = 180,
           append: str = "") -> Iterator[NbdGuest]:
    """Boot the NBD guest with SOCKET forwarded to GUEST_HOST:GUEST_PORT; yield it once its
    /init is ready for commands; always stop it (and its forwarders) afterwards.

        with kernel_nbd.booted(server.socket_path, tmp / "guest") as vm:
            vm.run(f"nbd-client {GUEST_HOST} {GUEST_PORT} /dev/nbd0 -N vol0")
    """
    images = images or nbd_guest_images()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("console.log", "control.sock", "socat.pids"):
        (workdir / stale).unlink(missing_ok=True)
    argv = qemu_argv(socket, images, workdir, memory_mib=memory_mib, reconnect_wait=reconnect_wait,
                     append=append)
    guest = NbdGuest(argv, workdir, boot_timeout=boot_timeout)
    try:
        yield guest
    finally:
        guest.close()

