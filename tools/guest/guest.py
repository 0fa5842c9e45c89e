"""The guest round trip: host plants a marker, a kernel boots from the export, host checks.

Why a protocol instead of "it booted": a boot that prints something proves
little about the block device.  Here the evidence crosses the device in both
directions:

  1. host:  nbdcopy the cached rootfs.ext4 onto the export, then (nbdfuse +
     loop + mount) write a fresh random token to /guest/marker;
  2. guest: qemu or UML boots with the export as its root disk; /sbin/init
     echoes the token into /guest/result, writes /guest/blob (random) with
     its sha256, remounts / read-only and powers off;
  3. host:  (nbdfuse + loop, read-only) fsck must be clean, /guest/result
     must carry the token, and the blob read back must hash to what the
     guest computed.

`roundtrip()` does all three and raises GuestError listing every problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Literal

from . import export as export_ops
from .build_initramfs import GuestImages, guest_images
from .fs import FsckResult, fsck, mounted
from .nbdfuse import attached
from .uml import boot_uml_export
from .vm import BootResult, GuestError, boot_qemu


@dataclasses.dataclass
class GuestOutput:
    """What the host finds on the export after the guest ran."""
    result: dict[str, str]          # /guest/result as key=value
    blob_sha256: str | None         # sha256 of /guest/blob as read by the host
    fsck: FsckResult


@dataclasses.dataclass
class RoundTrip:
    """Everything one round trip did, with per-phase durations in seconds."""
    token: str
    boot: BootResult
    output: GuestOutput
    seconds: dict[str, float]


def prepare_root(socket: str | os.PathLike, export: str, workdir: str | os.PathLike, *,
                 images: GuestImages | None = None, token: str | None = None,
                 blob_kib: int = 1024, install: bool = True) -> str:
    """Put the guest root filesystem on EXPORT and plant a fresh marker; return the token.

    With install=False the filesystem already on the export is reused (only
    the marker is replaced), e.g. to boot the same volume repeatedly.
    """
    images = images or guest_images()
    workdir = Path(workdir)
    if install:
        export_ops.write_image(socket, export, images.rootfs)
    token = token or secrets.token_hex(8)
    with attached(socket, export, workdir) as dev:
        with mounted(dev, workdir / "mnt-prepare", fstype="ext4") as mnt:
            g = mnt / "guest"
            g.mkdir(exist_ok=True)
            for stale in ("result", "result.tmp", "blob"):
                (g / stale).unlink(missing_ok=True)
            (g / "marker").write_text(token + "\n")
            (g / "blob_kib").write_text(f"{blob_kib}\n")
    return token


def collect(socket: str | os.PathLike, export: str, workdir: str | os.PathLike) -> GuestOutput:
    """Read what the guest left on EXPORT (read-only attach): fsck verdict, result, blob hash."""
    workdir = Path(workdir)
    with attached(socket, export, workdir, readonly=True) as dev:
        check = fsck(dev, "ext4")
        with mounted(dev, workdir / "mnt-collect", fstype="ext4", options="ro") as mnt:
            result_file, blob = mnt / "guest" / "result", mnt / "guest" / "blob"
            result = {}
            if result_file.exists():
                result = dict(ln.split("=", 1) for ln in result_file.read_text().splitlines() if "=" in ln)
            digest = hashlib.sha256(blob.read_bytes()).hexdigest() if blob.exists() else None
    return GuestOutput(result=result, blob_sha256=digest, fsck=check)


def problems(token: str, boot: BootResult, out: GuestOutput) -> list[str]:
    """Every way the round trip failed; empty means success."""
    found = []
    if not boot.ok:
        found.append(f"guest did not report OK (timed_out={boot.timed_out}, rc={boot.returncode}, "
                     f"line={boot.result_line!r})")
    elif boot.fields.get("marker") != token:
        found.append(f"guest console reported marker {boot.fields.get('marker')!r}, planted {token!r}")
    if out.result.get("marker") != token:
        found.append(f"/guest/result on the export has marker {out.result.get('marker')!r}, planted {token!r}")
    if out.blob_sha256 is None:
        found.append("/guest/blob missing on the export")
    elif out.blob_sha256 != out.result.get("blob_sha256"):
        found.append(f"/guest/blob reads back as sha256 {out.blob_sha256}, guest wrote "
                     f"{out.result.get('blob_sha256')}")
    if not out.fsck.clean:
        found.append(f"fsck after the guest: {out.fsck}")
    return found


def roundtrip(socket: str | os.PathLike, export: str, workdir: str | os.PathLike, *,
              client: Literal["qemu", "uml"] = "qemu", images: GuestImages | None = None,
              blob_kib: int = 1024, install: bool = True, timeout: float = 120) -> RoundTrip:
    """Plant, boot CLIENT (qemu or uml) from EXPORT, collect, verify; raise GuestError on any problem.

        rt = roundtrip(sock, "vol0", tmp_path, client="qemu")
        print(rt.seconds)   # {'prepare': .., 'boot': .., 'collect': ..}
    """
    images = images or guest_images()
    workdir = Path(workdir)
    seconds: dict[str, float] = {}
    t = time.monotonic()
    token = prepare_root(socket, export, workdir, images=images, blob_kib=blob_kib, install=install)
    seconds["prepare"] = time.monotonic() - t
    t = time.monotonic()
    if client == "qemu":
        boot = boot_qemu(socket, export, workdir, images=images, timeout=timeout)
    elif client == "uml":
        boot = boot_uml_export(socket, export, workdir, timeout=timeout)
    else:
        raise ValueError(f"unknown client {client!r}")
    seconds["boot"] = time.monotonic() - t
    t = time.monotonic()
    out = collect(socket, export, workdir)
    seconds["collect"] = time.monotonic() - t
    found = problems(token, boot, out)
    if found:
        try:
            boot.check()
        except GuestError as e:
            found.append(str(e))
        raise GuestError(f"{client} round trip on export {export!r} failed:\n  - " + "\n  - ".join(found))
    return RoundTrip(token=token, boot=boot, output=out, seconds=seconds)
