"""Build chunkvol's user-mode Linux kernel once, from Debian's linux-source-6.12.

Why not Debian's `linux.uml`: bookworm's user-mode-linux (6.1um4) panics on
hosts whose XSAVE area is larger than the FP buffer UML was compiled with --
in practice Intel CPUs with AMX.  The guest console shows

    userspace - ptrace set fp regs failed, errno = 14
    Kernel panic - not syncing: Attempted to kill init!

Cause: UML moves each guest task's FP registers with
PTRACE_GETREGSET/SETREGSET(NT_X86_XSTATE) and a fixed length, HOST_FP_SIZE:
2696 bytes, the XSAVE size of an AVX-512 CPU (gdb on Debian's linux.uml shows
iov_len=2696; 6.12's arch/x86/um/user-offsets.c has the same constant).  The
host kernel clamps a longer iov_len down to its own size, but
xstateregs_set() (arch/x86/kernel/fpu/regset.c) returns EFAULT unless the
length is exactly the host's full user XSAVE size (fpu_user_cfg.max_size).
That is 11008 bytes on this AMX host (measured: PTRACE_GETREGSET into a
large buffer returns iov_len=11008; SETREGSET with 832 or 2696 bytes fails
with EFAULT, with 11008 it succeeds).  Hosts whose XSAVE area is at most
2696 bytes (AMD, Intel without AMX) are unaffected.  Debian's 6.12 source
still has the fixed length; upstream fixed it later.

So this module builds a user-mode Linux from /usr/src/linux-source-6.12.tar.xz
(package linux-source-6.12) with our patch tools/guest/uml/*.patch
(`patch -p1`; its header explains it: the host's XSAVE size is measured at
boot and the full state is transferred and stored per task) and a minimal
configuration: `make ARCH=um tinyconfig` plus tools/guest/uml/uml.config.
Every host then runs the same UML.

Built once into a cache outside the work tree: $CHUNKVOL_UML_CACHE, else
/var/cache/chunkvol/uml, under a key hashing the source package version (and
the tarball's size and mtime), the patches, the config fragment and this
file.  The build runs in a temporary directory next to the cache entry and is
renamed into place, so concurrent runs never see half a kernel; a lock file
makes a second concurrent run wait instead of building again.  A build that
fails raises UmlBuildError with the tail of its log (kept next to the cache).

Cost: about 2 minutes once with `make -j$(nproc)` on a 2-core machine (measured
123 s: 108 s compiling, the rest extracting, patching and configuring); the
binary is ~5 MB and boots to the guest's /sbin/init in about 0.2 s.

CLI:  python3 -m tools.guest.uml_kernel [--cache DIR]     (prints the binary's path)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from . import _proc

HERE = Path(__file__).resolve().parent
SOURCE_PACKAGE = "linux-source-6.12"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
PATCH_DIR = HERE / "uml"
CONFIG_FRAGMENT = PATCH_DIR / "uml.config"
DEFAULT_CACHE = Path("/var/cache/chunkvol/uml")
CACHE_ENV = "CHUNKVOL_UML_CACHE"
BINARY_NAME = "linux"

# Inherited variables that would change what the kernel's make does (a parent
# make's jobserver, an output directory, a cross compiler, ...).
_MAKE_ENV_DROP = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "GNUMAKEFLAGS", "O",
                  "KBUILD_OUTPUT", "KCONFIG_CONFIG", "ARCH", "SUBARCH", "CROSS_COMPILE",
                  "LOCALVERSION", "KCFLAGS", "KCPPFLAGS", "KAFLAGS", "KBUILD_EXTMOD")


class UmlBuildError(RuntimeError):
    """Building the user-mode kernel failed; the message holds the log tail."""


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The cache root: CACHE, else $CHUNKVOL_UML_CACHE, else /var/cache/chunkvol/uml."""
    return Path(cache or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def patches() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def source_version(tarball: Path = SOURCE_TARBALL) -> str:
    """The source package's version plus the tarball's size and mtime (cheap, no hashing 150 MB)."""
    if not tarball.exists():
        raise UmlBuildError(f"{tarball} is missing: install Debian package {SOURCE_PACKAGE} "
                            f"(make system-packages)")
    version = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
                                 capture_output=True, text=True, env=_proc.system_env()).stdout.strip() or "?"
    st = tarball.stat()
    return f"{SOURCE_PACKAGE} {version} {st.st_size} {st.st_mtime_ns}"


def cache_key(tarball: Path = SOURCE_TARBALL) -> str:
    """Hash of everything the binary depends on: source version, patches, config fragment, this file."""
    h = hashlib.sha256()
    h.update(source_version(tarball).encode())
    for path in [*patches(), CONFIG_FRAGMENT, Path(__file__).resolve()]:
        h.update(f"\0{path.name}\0".encode())
        h.update(path.read_bytes())
    return "6.12-" + h.hexdigest()[:16]


def kernel_path(cache: str | os.PathLike | None = None) -> Path:
    """Where the binary for the current inputs lives (whether or not it is built yet)."""
    return cache_dir(cache) / cache_key() / BINARY_NAME


def uml_kernel(cache: str | os.PathLike | None = None, *,
               log: Callable[[str], None] | None = None) -> Path:
    """The path of the built user-mode Linux binary; build it first if it is not cached.

    Raises UmlBuildError if the build fails (never returns a half-built kernel).
    """
    log = log or _stderr
    target = kernel_path(cache)
    if target.is_file():
        return target
    root = target.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{target.parent.name}.lock"):
        if target.is_file():  # built by a concurrent run while we waited
            return target
        _build(target.parent, log)
    return target


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _make_env() -> dict[str, str]:
    env = _proc.system_env()
    for name in _MAKE_ENV_DROP:
        env.pop(name, None)
    return env


def _run_logged(argv: list[str], cwd: Path, logfile: Path, what: str,
                log: Callable[[str], None], *, stdin: Path | None = None) -> None:
    """Run ARGV in CWD appending its output to LOGFILE; print a line every 30 s; raise on failure."""
    started = time.monotonic()
    with open(logfile, "ab") as out, open(stdin or os.devnull, "rb") as inp:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, cwd=cwd, stdin=inp, stdout=out, stderr=subprocess.STDOUT,
                                env=_make_env())
        while True:
            try:
                proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                log(f"uml-kernel:   ... {what}: {time.monotonic() - started:.0f} s")
    if proc.returncode != 0:
        raise UmlBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                            f"--- {logfile} (tail) ---\n{_proc.read_tail(logfile)}")


def _fragment_settings(fragment: Path) -> dict[str, str]:
    """CONFIG_X -> value ('y', '"str"', or 'n' for '# CONFIG_X is not set')."""
    wanted = {}
    for line in fragment.read_text().splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, value = line.split("=", 1)
            wanted[name] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            wanted[line[2:-len(" is not set")]] = "n"
    return wanted


def _check_config(config: Path, fragment: Path) -> None:
    have = _fragment_settings(config)
    wrong = [f"{name}: wanted {value}, got {have.get(name, 'n')}"
             for name, value in _fragment_settings(fragment).items() if have.get(name, "n") != value]
    if wrong:
        raise UmlBuildError(f"{fragment} did not apply (missing dependencies?):\n  " + "\n  ".join(wrong))


def _build(dest: Path, log: Callable[[str], None]) -> None:
    """Build into a temporary directory beside DEST, then rename the result to DEST."""
    started = time.monotonic()
    jobs = len(os.sched_getaffinity(0))
    for tool in ("make", "gcc", "flex", "bison", "bc", "patch", "xz", "tar"):
        _proc.which(tool)
    work = Path(tempfile.mkdtemp(prefix=f".build-{dest.name}-", dir=dest.parent))
    logfile = work / "build.log"
    ok = False
    try:
        log(f"uml-kernel: building user-mode Linux from {SOURCE_TARBALL} into {dest} "
            f"(make -j{jobs}, a few minutes; log: {logfile})")
        log(f"uml-kernel: [1/4] extracting {SOURCE_TARBALL.name}")
        _run_logged(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(work)], work, logfile, "extract", log)
        (src,) = [p for p in work.iterdir() if p.is_dir()]
        for patch in patches():
            log(f"uml-kernel: [2/4] applying {patch.name}")
            _run_logged(["patch", "-p1", "--forward", "--batch"], src, logfile, f"patch {patch.name}",
                        log, stdin=patch)
        log(f"uml-kernel: [3/4] configuring: tinyconfig + {CONFIG_FRAGMENT.name}")
        make = ["make", "ARCH=um", "SUBARCH=x86_64"]
        _run_logged([*make, "tinyconfig"], src, logfile, "make tinyconfig", log)
        _run_logged(["scripts/kconfig/merge_config.sh", "-m", ".config", str(CONFIG_FRAGMENT)], src,
                    logfile, "merge_config.sh", log)
        _run_logged([*make, "olddefconfig"], src, logfile, "make olddefconfig", log)
        _check_config(src / ".config", CONFIG_FRAGMENT)
        log(f"uml-kernel: [4/4] compiling (make -j{jobs} linux)")
        t = time.monotonic()
        _run_logged([*make, f"-j{jobs}", BINARY_NAME], src, logfile, "make linux", log)
        compile_seconds = time.monotonic() - t
        out = work / "out"
        out.mkdir()
        shutil.copy2(src / BINARY_NAME, out / BINARY_NAME)
        shutil.copy2(src / ".config", out / "config")
        shutil.copy2(logfile, out / "build.log")
        seconds = time.monotonic() - started
        (out / "build-info.json").write_text(json.dumps({
            "source": source_version(), "patches": [p.name for p in patches()],
            "config_fragment": CONFIG_FRAGMENT.name, "jobs": jobs,
            "compile_seconds": round(compile_seconds, 1), "total_seconds": round(seconds, 1),
        }, indent=2) + "\n")
        os.rename(out, dest)  # atomic: DEST appears complete or not at all
        ok = True
        log(f"uml-kernel: built {dest / BINARY_NAME} in {seconds:.0f} s "
            f"(compile {compile_seconds:.0f} s with -j{jobs})")
    finally:
        if not ok and logfile.exists():
            kept = dest.parent / f"{dest.name}.failed.log"
            shutil.copy2(logfile, kept)
            log(f"uml-kernel: build FAILED; log kept at {kept}")
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", help=f"cache root (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    args = ap.parse_args(argv)
    target = kernel_path(args.cache)
    if target.is_file():
        print(f"uml-kernel: cached {target}", file=sys.stderr)
    print(uml_kernel(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
