"""Whole-export operations with libnbd's command-line clients (nbdinfo, nbdcopy).

Why: putting a prebuilt disk image onto an export, or pulling an export back
into a file for offline inspection, should not need a mount.  nbdcopy and
nbdinfo are themselves real NBD clients (multi-connection, zero/trim aware),
so using them also exercises the server.
"""

from __future__ import annotations

import os

from . import _proc
from .nbdfuse import nbd_uri


def export_size(socket: str | os.PathLike, export: str = "") -> int:
    """Size of EXPORT in bytes, as the server announces it."""
    return int(_proc.run(["nbdinfo", "--size", nbd_uri(socket, export)]).stdout.strip())


def write_image(socket: str | os.PathLike, export: str, image: str | os.PathLike) -> None:
    """Copy the file IMAGE onto the start of EXPORT (which must be at least as large)."""
    size, image_size = export_size(socket, export), os.path.getsize(image)
    if size < image_size:
        raise ValueError(f"export {export!r} is {size} bytes, image {image} needs {image_size}")
    _proc.run(["nbdcopy", os.fspath(image), nbd_uri(socket, export)], timeout=600)


def read_image(socket: str | os.PathLike, export: str, dest: str | os.PathLike) -> None:
    """Copy all of EXPORT into the local file DEST (created or overwritten)."""
    _proc.run(["nbdcopy", nbd_uri(socket, export), os.fspath(dest)], timeout=600)
