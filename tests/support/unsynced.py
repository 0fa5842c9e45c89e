"""What a filesystem may show of files written without a sync after a crash or failover."""

from __future__ import annotations

from pathlib import Path

SECTOR = 512  # granularity of the "written or still zero" check: below any filesystem block


def check_maybe_lost(src: Path, dst: Path) -> list[str]:
    """Files written without a sync may be missing, short, or have blocks still reading as
    zeros (unwritten extents), but they must never hold bytes that were not written there."""
    problems = []
    for path in sorted(src.rglob("*.bin")):
        target = dst / path.relative_to(src)
        if not target.is_file():
            continue
        want, got = path.read_bytes(), target.read_bytes()
        if len(got) > len(want):
            problems.append(f"{target}: {len(got)} bytes, only {len(want)} were written")
            continue
        for at in range(0, len(got), SECTOR):
            piece = got[at:at + SECTOR]
            if piece != want[at:at + len(piece)] and piece.count(0) != len(piece):
                problems.append(f"{target}: block at {at} holds bytes never written there")
                break
    return problems
