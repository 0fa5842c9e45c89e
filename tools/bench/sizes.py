"""Byte counts written the way the tools take them ("4G", "256M") and read back."""

from __future__ import annotations

UNITS = (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))


def parse_size(text: str) -> int:
    """'4G', '256M', '512k', '4GiB' or a plain byte count -> bytes."""
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    for suffix, factor in UNITS:
        if cleaned.endswith(suffix):
            return int(float(cleaned[:-1]) * factor)
    return int(cleaned)


def format_size(size_bytes: int) -> str:
    """The shortest exact suffixed form: 4294967296 -> '4G'; otherwise the byte count."""
    for suffix, factor in UNITS:
        if size_bytes >= factor and size_bytes % factor == 0:
            return f"{size_bytes // factor}{suffix}"
    return str(size_bytes)
