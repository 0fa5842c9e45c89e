"""Raw images of compressible data, made by fio, for nbdcopy and the qcow2+zstd prefill.

Why fio makes them: the fio workloads write fio's ``buffer_compress_percentage`` data, so
images made the same way hold the same kind of bytes (about 2:1 with zstd level 1 at
50 %, every 4 KiB block distinct thanks to ``refill_buffers``). Compressing stores are
then measured on data that compresses, and none of it is all zeros, so nbdcopy cannot skip
any of it as sparse. Images are kept in SCRATCH/data and reused when the size and
setting match: making 4 GiB costs a few seconds, and the content need not be fresh.
"""

from __future__ import annotations

import os
from pathlib import Path

from commands import run_checked
from sizes import format_size


def data_image(scratch: Path, size_bytes: int, compress_percent: int) -> Path:
    """Path of a raw image of ``size_bytes`` bytes, made now if it is not there yet."""
    directory = scratch / "data"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"image-{format_size(size_bytes)}-c{compress_percent}.raw"
    if path.exists() and path.stat().st_size == size_bytes:
        return path
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    argv = ["fio", "--name=datagen", f"--filename={partial}", "--rw=write", "--bs=1M",
            f"--size={size_bytes}", "--ioengine=psync", "--refill_buffers",
            "--output-format=terse"]
    if compress_percent:
        argv.append(f"--buffer_compress_percentage={compress_percent}")
    run_checked(argv)
    os.replace(partial, path)
    return path
