"""Fixtures for real-client tests: NBD exports to point clients at, and a leak check.

EXPORT_KINDS maps a name to a context-manager factory that serves one export
and yields an `Export`.  Tests that take the `export` fixture run once per
kind in $CHUNKVOL_REALCLIENTS_KINDS (default "file,chunkvol").  "chunkvol"
serves a fresh pool (16 MiB chunks) through `nbdkit python
nbdkit_plugin/chunkvol_plugin.py pool=DIR`, export "vol0"; "file" is nbdkit's
file plugin, the reference that proves the tooling itself; "memory" (nbdkit's
memory plugin) is left out by default to keep the run short:

    CHUNKVOL_REALCLIENTS_KINDS=memory,file,chunkvol pytest tests/realclients

The product's own acceptance tests (test_chunkvol_clients.py) always run on
chunkvol, with pools of their own.

Every test here is also checked for leaks: after it, no loop device may be
backed by a file under its tmp_path, nothing may be mounted under it, and no
child process of pytest may be left running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.guest import build_initramfs, uml  # noqa: E402
from tools.guest.nbdkit import Server, served  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "realclients: drives real NBD clients (nbdfuse+loop, qemu, UML); "
                                       "needs root, /dev/fuse and loop devices")
    config.addinivalue_line("markers", "vm: boots a kernel (qemu TCG or user-mode-linux)")
    config.addinivalue_line("markers", "uml: boots the built user-mode Linux; skipped, with UML's own "
                                       "words, only where the host cannot run it (see pytest_runtest_setup)")


def _missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, mount)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing_capability()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a test marked `uml` where user-mode Linux cannot run on this host, with the reason.

    The probe (tools.guest.uml.unusable_reason) boots the built kernel once per
    process.  It is the only way these tests skip: a kernel that does not build
    (the first call builds it, minutes, if `make uml-kernel` has not) or a boot
    failing for any other reason raises, so the test errors loudly.
    """
    if item.get_closest_marker("uml") is None:
        return
    reason = uml.unusable_reason()
    if reason is not None:
        pytest.skip(f"user-mode Linux cannot run on this host: {reason}")


@dataclasses.dataclass
class Export:
    """One served export: pass `socket` and `name` to the tools."""
    server: Server
    name: str
    workdir: Path

    @property
    def socket(self) -> str:
        return self.server.socket


@contextlib.contextmanager
def memory_export(workdir: Path) -> Iterator[Export]:
    """nbdkit memory plugin, 1 GiB, default export name."""
    with served(["memory", "1G"], workdir / "srv") as server:
        yield Export(server, "", workdir)


@contextlib.contextmanager
def file_export(workdir: Path) -> Iterator[Export]:
    """nbdkit file plugin in dir= mode: the export name selects a file, like a chunkvol volume name."""
    pool = workdir / "pool"
    pool.mkdir(parents=True)
    with open(pool / "vol0", "wb") as f:
        f.truncate(1 << 30)
    with served(["file", f"dir={pool}"], workdir / "srv") as server:
        yield Export(server, "vol0", workdir)


@contextlib.contextmanager
def chunkvol_export(workdir: Path) -> Iterator[Export]:
    """chunkvol's own plugin: a fresh pool (16 MiB chunks, so clients cross chunk switches)
    with a 1 GiB volume "vol0"."""
    cli = REPO / ".venv" / "bin" / "chunkvol"
    pool = workdir / "pool"
    for args in (["init", "--chunk-size", "16M"], ["volume", "create", "vol0", "--size", "1G"]):
        subprocess.run([str(cli), "--pool", str(pool), *args], check=True, capture_output=True)
    plugin = REPO / "nbdkit_plugin" / "chunkvol_plugin.py"
    with served(["python", str(plugin), f"pool={pool}"], workdir / "srv") as server:
        yield Export(server, "vol0", workdir)


EXPORT_KINDS: dict[str, Callable[[Path], ContextManager[Export]]] = {
    "memory": memory_export,
    "file": file_export,
    "chunkvol": chunkvol_export,
}

# Which kinds the `export` fixture runs: $CHUNKVOL_REALCLIENTS_KINDS (comma-separated),
# default nbdkit's file plugin (the reference) and chunkvol.
DEFAULT_KINDS = "file,chunkvol"
SELECTED_KINDS = [k.strip() for k in os.environ.get("CHUNKVOL_REALCLIENTS_KINDS", DEFAULT_KINDS).split(",")
                  if k.strip()]


@pytest.fixture(params=SELECTED_KINDS)
def export(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Export]:
    """An export of each selected kind (see SELECTED_KINDS); stopped after the test."""
    if request.param not in EXPORT_KINDS:
        raise ValueError(f"unknown export kind {request.param!r}; known: {sorted(EXPORT_KINDS)}")
    with EXPORT_KINDS[request.param](tmp_path) as exp:
        yield exp


@pytest.fixture
def file_pool_export(tmp_path: Path) -> Iterator[Export]:
    """Just the file-plugin export (named volumes), for tests about export names."""
    with file_export(tmp_path) as exp:
        yield exp


@pytest.fixture
def guest_images() -> build_initramfs.GuestImages:
    """Guest images from the cache ($CHUNKVOL_GUEST_CACHE or ./var/guest), built if missing.

    Function-scoped on purpose: the check is cheap, and ./var is shared with
    other work (`make clean` removes it), so a cache that vanished mid-session
    is rebuilt instead of failing every later VM test.
    """
    return build_initramfs.guest_images()


def _descendants(pid: int) -> list[tuple[int, str]]:
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        names[int(entry)] = name
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append((p, names.get(p, "?")))
        todo.extend(children.get(p, []))
    return found


def _leaked_loops(root: str) -> list[tuple[str, str]]:
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            target = backing.read_text().strip()
            if target.startswith(root):
                found.append((f"/dev/{backing.parent.parent.name}", target))
    return found


def _leaked_mounts(root: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return sorted((p for p in points if p.startswith(root)), key=len, reverse=True)


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path) -> Iterator[None]:
    """Fail the test if it left loop devices, mounts or processes behind, then clean them up.

    Checked after the test's own fixtures (export servers) were torn down:
    this autouse fixture is set up before them, so it is torn down after.
    Only processes that appeared during the test count.  Leaks are removed
    (by device, mount point and PID) so one test's leak does not fail the next.
    """
    root = str(tmp_path.resolve())
    before = {pid for pid, _ in _descendants(os.getpid())}
    yield
    loops = _leaked_loops(root)
    mounts = _leaked_mounts(root)
    procs = [(pid, name) for pid, name in _descendants(os.getpid()) if pid not in before]
    for point in mounts:
        subprocess.run(["umount", "-l", point], capture_output=True)
    for dev, _ in loops:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    for pid, _ in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    leaks = [f"loop device {dev} still backed by {target}" for dev, target in loops]
    leaks += [f"still mounted: {point}" for point in mounts]
    leaks += [f"child process left running: {pid} {name}" for pid, name in procs]
    assert not leaks, "test leaked (now cleaned up):\n  " + "\n  ".join(leaks)
