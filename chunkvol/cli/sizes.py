"""Sizes as users type them (64M, 8G, 4096) and as they read them."""

import re

from chunkvol.errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text):
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"invalid size {text!r}: use a number of bytes or a number with K, M, G, T or P")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def format_size(count):
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
