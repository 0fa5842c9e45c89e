"""Build (and cache) the tiny guest images: an initramfs for qemu and an ext4 root filesystem.

Why: the point of the VM tests is "a real kernel's root disk is a volume".
The Debian kernel in /boot has virtio_blk and ext4 as modules, so it cannot
mount root=/dev/vda by itself; Debian's own initrd could, but it is large and
slow to unpack under TCG.  So we build:

  * initramfs.cpio -- busybox + the few .ko files needed (virtio_pci,
    virtio_blk, ext4 and their deps, crc32c for ext4 checksums) + an /init
    that loads them, mounts root=/dev/vda and switch_roots into it.  Written
    by a pure-Python cpio writer so it can hold /dev/console without mknod.
  * rootfs.ext4 -- a 32 MiB ext4 image made by `mkfs.ext4 -d` (no mounting):
    busybox + /sbin/init running the guest protocol (see GUEST_INIT).  The
    same image boots under qemu (after the initramfs) and user-mode-linux
    (whose kernel has ubd and ext4 built in, so it needs no initramfs).

A third image, for the kernel's own NBD client (tools/guest/kernel_nbd.py), has no root
disk at all: nbd-initramfs.cpio holds busybox, nbd-client, mke2fs and e2fsck (each with its
shared libraries, copied from this host), the modules virtio_pci, virtio_net, nbd and ext4
(with their deps), and an /init that brings up the network and then runs the lines the host
sends on the second serial port (see NBD_GUEST_INIT).  `nbd_guest_images()` builds it on
demand, in a cache directory of its own; `guest_images()` does not build it.

All go to a cache directory ($CHUNKVOL_GUEST_CACHE, else <repo>/var/guest),
under a key that hashes this file, the busybox binary and the kernel version
(the NBD guest's key also hashes the programs and libraries it copies), so
edits here rebuild and repeated test runs reuse them.  Builds happen in a
temporary directory renamed into place, so concurrent runs cannot see a
half-written image.

busybox: Debian's busybox-static is used as is; the dynamically linked
`busybox` package also works (its shared libraries are copied in).

CLI:  python3 -m tools.guest.build_initramfs [--cache DIR] [--nbd-guest]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import struct
import tempfile
import zlib
from pathlib import Path

from . import _proc

REPO = Path(__file__).resolve().parents[2]
ROOTFS_SIZE = "32M"
RESULT_PREFIX = "CHUNKVOL-GUEST-RESULT:"

# Modules for "root on virtio disk, ext4", leaves first is not required: deps are resolved.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")

INITRAMFS_INIT = r"""#!/bin/sh
# initramfs /init: load drivers, mount root=, switch_root into its /sbin/init.
export PATH=/bin
fail() { echo "%(prefix)s FAIL initramfs: $*"; poweroff -f; reboot -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in %(modules)s; do insmod /lib/modules/$m.ko || fail "insmod $m"; done
root=/dev/vda; fstype=ext4; init=/sbin/init
for arg in $(cat /proc/cmdline); do
  case "$arg" in root=*) root=${arg#root=};; rootfstype=*) fstype=${arg#rootfstype=};; init=*) init=${arg#init=};; esac
done
i=0
while [ ! -b "$root" ]; do
  i=$((i+1)); [ $i -gt 600 ] && fail "no block device $root"; sleep 0.1
done
mount -t "$fstype" -o rw "$root" /newroot || fail "mount $root"
[ -x "/newroot$init" ] || fail "no $init on $root"
mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot "$init"
"""

GUEST_INIT = r"""#!/bin/sh
# Guest protocol (the volume's /sbin/init).  The host put /guest/marker on the
# volume (and optionally /guest/blob_kib).  We prove we booted from it by
# echoing the marker back into /guest/result together with what / is mounted
# from, write a random blob plus its sha256, make the filesystem clean
# (remount read-only), print one result line on the console and power off.
export PATH=/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
say() { echo "%(prefix)s $*"; }
halt_now() { sync; mount -o remount,ro / ; poweroff -f; reboot -f; }
mount -o remount,rw / || { say "FAIL cannot remount / rw"; halt_now; }
marker=$(cat /guest/marker 2>/dev/null)
[ -n "$marker" ] || { say "FAIL no /guest/marker on the root disk"; halt_now; }
kib=$(cat /guest/blob_kib 2>/dev/null); [ -n "$kib" ] || kib=1024
rootdev=$(awk '$2 == "/" { d = $1 " " $3 } END { print d }' /proc/mounts)
dd if=/dev/urandom of=/guest/blob bs=1024 count="$kib" 2>/dev/null || { say "FAIL writing blob"; halt_now; }
blobsum=$(sha256sum /guest/blob | cut -d' ' -f1)
{
  echo "marker=$marker"
  echo "kernel=$(uname -r)"
  echo "root=$rootdev"
  echo "blob_sha256=$blobsum"
} > /guest/result.tmp && mv /guest/result.tmp /guest/result || { say "FAIL writing result"; halt_now; }
sync
if mount -o remount,ro /; then clean=yes; else clean=no; fi
say "OK marker=$marker kernel=$(uname -r) root=$(echo $rootdev | tr ' ' ':') blob_sha256=$blobsum clean_unmount=$clean"
poweroff -f
reboot -f
"""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A bootable Debian kernel and its module tree."""
    version: str
    vmlinuz: Path
    moddir: Path


@dataclasses.dataclass(frozen=True)
class GuestImages:
    """Paths of the cached guest images (all read-only inputs for boots).

    `vmlinux` is the kernel decompressed out of vmlinuz (an ELF with a PVH
    entry note) or None if that failed; qemu boots it directly, skipping
    the firmware's bzImage loader and ~2.5 s of in-guest xz decompression
    under TCG.
    """
    kernel: Kernel
    initramfs: Path
    rootfs: Path
    vmlinux: Path | None


def find_kernel(version: str | None = None) -> Kernel:
    """The /boot kernel to boot (newest with a module tree, or VERSION if given)."""
    candidates = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        ver = vmlinuz.name[len("vmlinuz-"):]
        moddir = Path("/lib/modules") / ver
        if (moddir / "modules.dep").exists() and (version is None or ver == version):
            candidates.append(Kernel(ver, vmlinuz, moddir))
    if not candidates:
        raise FileNotFoundError("no /boot/vmlinuz-* with /lib/modules/<ver>/modules.dep "
                                "(install the Debian package linux-image-amd64)")
    return max(candidates, key=lambda k: [int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", k.version)])


def find_busybox() -> Path:
    """The busybox binary ($CHUNKVOL_BUSYBOX, else from busybox-static or busybox)."""
    for cand in (os.environ.get("CHUNKVOL_BUSYBOX"), "/bin/busybox", "/usr/bin/busybox"):
        if cand and os.access(cand, os.X_OK):
            return Path(cand).resolve()
    raise FileNotFoundError("busybox not found: install Debian's busybox-static (or busybox)")


def shared_libs(binary: Path) -> list[Path]:
    """Shared libraries BINARY needs (empty for a static binary), via ldd."""
    proc = _proc.run(["ldd", binary], check=False)
    libs = []
    for line in proc.stdout.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def busybox_applets(busybox: Path) -> list[str]:
    """Applet names this busybox provides."""
    return [a for a in _proc.run([busybox, "--list"]).stdout.split() if a and "/" not in a]


def module_closure(kernel: Kernel, names: tuple[str, ...]) -> list[Path]:
    """.ko files for NAMES and all their dependencies, in a valid load order."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
        by_name[_modname(mod)] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in deps.get(mod, []):
            visit(dep)
        order.append(mod)
    for name in names:
        key = name.replace("-", "_")
        if key not in by_name:
            raise FileNotFoundError(f"module {name} not in {kernel.moddir}/modules.dep "
                                    f"(built in? then drop it from INITRAMFS_MODULES)")
        visit(by_name[key])
    return [kernel.moddir / m for m in order]


def _modname(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    # Busybox insmod may lack decompression; hand it a plain .ko.
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return _proc.run(["zstd", "-dc", path], input=b"").stdout
    return data


class CpioWriter:
    """Minimal "newc" cpio archive writer (the format the kernel unpacks as initramfs)."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self._ino = 1
        self._seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self._seen:
            return
        self._seen.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._f.write(header + encoded)
        self._f.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._f.write(data)
        self._f.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.dir(parent)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
        self._f.write(b"\0" * (-self._f.tell() % 512))
        self._f.close()


def _program_payload(program: Path, dest: str) -> dict[str, bytes]:
    """Files (path -> bytes) that make PROGRAM run at DEST: itself plus its shared libraries
    (at the paths ldd names, which the guest's dynamic loader searches too)."""
    files = {dest: program.read_bytes()}
    for lib in shared_libs(program):
        files[str(lib)] = lib.resolve().read_bytes()  # /lib64/ld-linux... is a symlink on Debian
    return files


def _busybox_payload(busybox: Path) -> dict[str, bytes]:
    """Files (path -> bytes) that make busybox run: itself plus its shared libraries."""
    return _program_payload(busybox, "/bin/busybox")


def build_initramfs(out: Path, kernel: Kernel, busybox: Path | None = None) -> Path:
    """Write the qemu initramfs (uncompressed newc cpio) to OUT."""
    busybox = busybox or find_busybox()
    mods = module_closure(kernel, INITRAMFS_MODULES)
    w = CpioWriter(out)
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
        w.dir(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    for path, data in _busybox_payload(busybox).items():
        w.file(path, data)
    for applet in busybox_applets(busybox):
        w.symlink(f"bin/{applet}", "busybox")
    for mod in mods:
        w.file(f"lib/modules/{_modname(mod.name)}.ko", _module_bytes(mod), 0o644)
    script = INITRAMFS_INIT % {"prefix": RESULT_PREFIX, "modules": " ".join(_modname(m.name) for m in mods)}
    w.file("init", script.encode())
    w.close()
    return out


def build_rootfs(out: Path, busybox: Path | None = None, size: str = ROOTFS_SIZE) -> Path:
    """Write the ext4 root filesystem image (busybox + guest /sbin/init) to OUT."""
    busybox = busybox or find_busybox()
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=out.parent) as tmp:
        root = Path(tmp)
        for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "etc", "root", "guest"):
            (root / d).mkdir()
        for path, data in _busybox_payload(busybox).items():
            dest = root / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            dest.chmod(0o755)
        for applet in busybox_applets(busybox):
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        init = root / "sbin" / "init"
        init.write_text(GUEST_INIT % {"prefix": RESULT_PREFIX})
        init.chmod(0o755)
        (root / "etc" / "hostname").write_text("chunkvol-guest\n")
        out.unlink(missing_ok=True)
        _proc.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "chunkvol-root", "-d", root, out, size])
    return out


# --- the kernel NBD client's guest (initramfs only) -------------------------------------------

# virtio_net for the user-mode network that reaches the host's socket, nbd for /dev/nbd0, ext4
# (crc32c_generic: its metadata checksums); virtio_pci carries the network card.
NBD_GUEST_MODULES = ("virtio_pci", "virtio_net", "nbd", "crc32c_generic", "ext4")
# Host programs copied into the NBD guest as /sbin/NAME, with their shared libraries.
NBD_GUEST_PROGRAMS = ("nbd-client", "mke2fs", "e2fsck")
NBD_GUEST_LINKS = {"sbin/mkfs.ext4": "mke2fs", "sbin/fsck.ext4": "e2fsck"}
NBD_GUEST_ADDRESS = "10.0.2.15/24"      # qemu user network: the guest's address
NBD_STEP_PREFIX = "CHUNKVOL-NBD:"

NBD_GUEST_INIT = r"""#!/bin/sh
# initramfs /init of the kernel-NBD-client guest (no root disk).  Loads the modules, brings up
# eth0 (qemu's user network; the host's NBD socket is forwarded to a fixed address there), then
# serves the control channel on /dev/ttyS1: each line from the host is "SEQ COMMAND", COMMAND
# runs in a subshell (stdin /dev/null), its output and exit code go to the console (ttyS0) and
# back on ttyS1 as "| OUTPUT LINE"... then "END SEQ RC".
export PATH=/sbin:/bin
say() { echo "@STEP@ $*"; }
fail() { echo "@RESULT@ FAIL $*"; poweroff -f; reboot -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
ln -sf /proc/mounts /etc/mtab
for m in @MODULES@; do insmod /lib/modules/$m.ko || fail "insmod $m"; done
i=0
while [ ! -e /sys/class/net/eth0 ]; do
  i=$((i+1)); [ $i -gt 600 ] && fail "no eth0"; sleep 0.1
done
ip link set lo up && ip link set eth0 up && ip addr add @ADDRESS@ dev eth0 || fail "network setup"
[ -c /dev/ttyS1 ] || fail "no /dev/ttyS1 (the control channel)"
stty -F /dev/ttyS1 raw -echo || fail "stty /dev/ttyS1"
exec 3<>/dev/ttyS1

# write_tree DIR FILES: FILES files of random bytes (0 to 700 KiB, most sizes no multiple of
# 512) in nested directories under DIR, then DIR/MANIFEST.sha256 (sha256sum of every file,
# sorted).  Prints files=, bytes= and the manifest's own sha256.
write_tree() {
  dir=$1; n=$2; i=0; bytes=0
  mkdir -p "$dir" && : > "$dir/empty" || return 1
  while [ $i -lt $n ]; do
    sub="$dir/d$((i % 3))/e$((i % 2))"
    size=$(( (i * 7919 + 13) % 700 * 1021 + i ))
    mkdir -p "$sub" && head -c $size /dev/urandom > "$sub/f$i.bin" || return 1
    bytes=$((bytes + size)); i=$((i + 1))
  done
  (cd "$dir" && find . -type f ! -name MANIFEST.sha256 | sort | xargs sha256sum > MANIFEST.sha256) || return 1
  echo "files=$((n + 1)) bytes=$bytes manifest_sha256=$(sha256sum < "$dir/MANIFEST.sha256" | cut -d' ' -f1)"
}

# check_tree DIR: every file DIR/MANIFEST.sha256 lists has its sha256 (read from the device:
# caches dropped first) and DIR holds no other file.  Prints verified= and the manifest's sha256.
check_tree() {
  sync; echo 3 > /proc/sys/vm/drop_caches
  cd "$1" || return 1
  sha256sum -c MANIFEST.sha256 > /tmp/check.out 2>&1 || { grep -v ': OK$' /tmp/check.out; return 1; }
  want=$(wc -l < MANIFEST.sha256); have=$(find . -type f ! -name MANIFEST.sha256 | wc -l)
  [ "$want" -eq "$have" ] || { echo "$1: $have files, the manifest lists $want"; return 1; }
  echo "verified=$want manifest_sha256=$(sha256sum < MANIFEST.sha256 | cut -d' ' -f1)"
}

# fsck_report DEV: e2fsck -fn DEV (unmounted, nothing changed); the guest's result line on the
# console says whether it was clean.
fsck_report() {
  e2fsck -fn "$1"; rc=$?
  if [ $rc -eq 0 ]; then echo "@RESULT@ OK fsck=clean device=$1"
  else echo "@RESULT@ FAIL fsck=exit-$rc device=$1"; fi
  return $rc
}

say "READY kernel=$(uname -r)"
while IFS= read -r line <&3; do
  seq=${line%% *}; cmd=${line#* }
  say "RUN $seq: $cmd"
  ( eval "$cmd" ) </dev/null >/tmp/out 2>&1 3>&-
  rc=$?
  [ -z "$(tail -c 1 /tmp/out)" ] || echo >> /tmp/out  # the END line starts a line of its own
  cat /tmp/out
  say "END $seq rc=$rc"
  sed 's/^/| /' /tmp/out >&3
  echo "END $seq $rc" >&3
done
fail "control channel closed"
"""


@dataclasses.dataclass(frozen=True)
class NbdGuestImages:
    """The kernel-NBD-client guest: a kernel and an initramfs that is the whole system."""
    kernel: Kernel
    initramfs: Path
    vmlinux: Path | None


def nbd_guest_programs() -> dict[str, Path]:
    """The host's nbd-client, mke2fs and e2fsck (name -> resolved path), for the NBD guest."""
    found = {}
    for name in NBD_GUEST_PROGRAMS:
        path = shutil.which(name, path=_proc.SYSTEM_PATH)
        if path is None:
            package = "nbd-client" if name == "nbd-client" else "e2fsprogs"
            raise FileNotFoundError(f"{name} not found (install Debian's {package})")
        found[name] = Path(path).resolve()
    return found


def build_nbd_initramfs(out: Path, kernel: Kernel, busybox: Path | None = None) -> Path:
    """Write the NBD guest's initramfs (uncompressed newc cpio; NBD_GUEST_INIT as /init) to OUT."""
    busybox = busybox or find_busybox()
    mods = module_closure(kernel, NBD_GUEST_MODULES)
    w = CpioWriter(out)
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "etc", "lib/modules"):
        w.dir(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    for path, data in _busybox_payload(busybox).items():
        w.file(path, data)
    for name, program in nbd_guest_programs().items():
        for path, data in _program_payload(program, f"/sbin/{name}").items():
            w.file(path, data)
    for link, target in NBD_GUEST_LINKS.items():
        w.symlink(link, target)
    for applet in busybox_applets(busybox):
        w.symlink(f"bin/{applet}", "busybox")
    if Path("/etc/mke2fs.conf").exists():
        w.file("etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes(), 0o644)
    for mod in mods:
        w.file(f"lib/modules/{_modname(mod.name)}.ko", _module_bytes(mod), 0o644)
    script = (NBD_GUEST_INIT.replace("@STEP@", NBD_STEP_PREFIX).replace("@RESULT@", RESULT_PREFIX)
              .replace("@ADDRESS@", NBD_GUEST_ADDRESS)
              .replace("@MODULES@", " ".join(_modname(m.name) for m in mods)))
    w.file("init", script.encode())
    w.close()
    return out


def has_pvh_note(elf: bytes) -> bool:
    """Whether an ELF64 kernel has the Xen PVH entry note qemu needs to boot it directly."""
    if elf[4:5] != b"\x02":  # not ELF64
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(vmlinuz: Path, out: Path) -> bool:
    """Decompress the ELF kernel embedded in a bzImage into OUT; False if not possible.

    Same idea as the kernel's scripts/extract-vmlinux: find the payload's
    compression magic and decompress from there (xz and gzip via the stdlib).
    """
    data = vmlinuz.read_bytes()
    for magic, make in ((b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor()),
                        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(31))):
        start = data.find(magic)
        while start != -1:
            try:
                elf = make().decompress(data[start:])
            except (lzma.LZMAError, OSError, ValueError, zlib.error):
                elf = b""
            if elf[:4] == b"\x7fELF" and has_pvh_note(elf):
                out.write_bytes(elf)
                return True
            start = data.find(magic, start + 1)
    return False


def cache_dir() -> Path:
    """Where images are cached: $CHUNKVOL_GUEST_CACHE, else <repo>/var/guest."""
    return Path(os.environ.get("CHUNKVOL_GUEST_CACHE") or REPO / "var" / "guest")


def _cache_key(kernel: Kernel, busybox: Path) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(kernel.version.encode())
    h.update(hashlib.sha256(busybox.read_bytes()).digest())
    return h.hexdigest()[:16]


def _cached(final: Path, build) -> Path:
    """FINAL, built first by BUILD(tmpdir) unless FINAL/complete exists.  The build happens in
    a temporary directory beside FINAL, renamed into place, so concurrent runs never see a
    half-written image."""
    if not (final / "complete").exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
        try:
            build(tmp)
            try:
                tmp.rename(final)
            except OSError:  # another process won the race; its build is equivalent
                if not (final / "complete").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def guest_images(cache: Path | None = None, kernel_version: str | None = None) -> GuestImages:
    """Return cached guest images, building them first if the cache has none for this input."""
    kernel = find_kernel(kernel_version)
    busybox = find_busybox()
    cache = Path(cache or cache_dir())

    def build(tmp: Path) -> None:
        build_initramfs(tmp / "initramfs.cpio", kernel, busybox)
        build_rootfs(tmp / "rootfs.ext4", busybox)
        extract_vmlinux(kernel.vmlinuz, tmp / "vmlinux")
        (tmp / "complete").write_text(f"kernel={kernel.version} busybox={busybox}\n")
    final = _cached(cache / f"{kernel.version}-{_cache_key(kernel, busybox)}", build)
    vmlinux = final / "vmlinux"
    return GuestImages(kernel=kernel, initramfs=final / "initramfs.cpio", rootfs=final / "rootfs.ext4",
                       vmlinux=vmlinux if vmlinux.exists() else None)


def _nbd_cache_key(kernel: Kernel, busybox: Path, programs: dict[str, Path]) -> str:
    h = hashlib.sha256(_cache_key(kernel, busybox).encode())
    for program in programs.values():
        for path in [program, *shared_libs(program)]:
            h.update(hashlib.sha256(path.resolve().read_bytes()).digest())
    return h.hexdigest()[:16]


def nbd_guest_images(cache: Path | None = None, kernel_version: str | None = None) -> NbdGuestImages:
    """Return the cached kernel-NBD-client guest (cache/nbd-<kernel>-<key>), built if missing."""
    kernel = find_kernel(kernel_version)
    busybox = find_busybox()
    programs = nbd_guest_programs()
    cache = Path(cache or cache_dir())

    def build(tmp: Path) -> None:
        build_nbd_initramfs(tmp / "nbd-initramfs.cpio", kernel, busybox)
        extract_vmlinux(kernel.vmlinuz, tmp / "vmlinux")
        (tmp / "complete").write_text(f"kernel={kernel.version} busybox={busybox} "
                                      f"programs={' '.join(map(str, programs.values()))}\n")
    final = _cached(cache / f"nbd-{kernel.version}-{_nbd_cache_key(kernel, busybox, programs)}", build)
    vmlinux = final / "vmlinux"
    return NbdGuestImages(kernel=kernel, initramfs=final / "nbd-initramfs.cpio",
                          vmlinux=vmlinux if vmlinux.exists() else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache directory (default: %(default)s)")
    parser.add_argument("--kernel-version", default=None)
    parser.add_argument("--nbd-guest", action="store_true",
                        help="build the kernel-NBD-client guest (nbd_guest_images) instead")
    args = parser.parse_args(argv)
    if args.nbd_guest:
        images = nbd_guest_images(args.cache, args.kernel_version)
        fields: tuple[str, ...] = ("initramfs", "vmlinux")
    else:
        images = guest_images(args.cache, args.kernel_version)
        fields = ("initramfs", "rootfs", "vmlinux")
    for field in fields:
        print(f"{field}: {getattr(images, field)}")
    print(f"kernel: {images.kernel.vmlinuz}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
