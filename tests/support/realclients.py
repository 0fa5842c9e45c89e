"""Pools for the real-client tests (tests/realclients/): 16 MiB chunks, so every test's log
spans several chunks, and volumes big enough for xfs; the check that finds no damage; and a
clean stop of the server."""

import json
from pathlib import Path

from tests.support.server import NbdServer, chunkvol

CHUNK_SIZE = "16M"
CHUNK_BYTES = 16 << 20
VOLUME_SIZE = "384M"  # xfs refuses filesystems below 300 MiB
VOLUME = "vol0"


def make_pool(where: Path, *volumes: tuple[str, str]) -> str:
    """WHERE/pool with 16 MiB chunks and the given volumes: (name, compression)."""
    pool = str(where / "pool")
    chunkvol("--pool", pool, "init", "--chunk-size", CHUNK_SIZE)
    for name, compression in volumes or ((VOLUME, "none"),):
        chunkvol("--pool", pool, "volume", "create", name, "--size", VOLUME_SIZE, "--compression", compression)
    return pool


def check_pool(pool: str) -> dict:
    """`chunkvol check --json` must find no damage; returns its report."""
    result = chunkvol("--pool", pool, "check", "--json", check=False)
    assert result.returncode == 0, f"chunkvol check exited {result.returncode}: {result.stderr}{result.stdout}"
    report = json.loads(result.stdout)
    assert report["log_damage"] == [] and report["map_differences"] == [], report
    assert report["records"] > 0
    return report


def stop_cleanly(server: NbdServer) -> None:
    """SIGTERM (the plugin checkpoints and closes the pool); nbdkit must exit 0."""
    process = server.process
    server.stop()
    assert process.returncode == 0, f"nbdkit exited {process.returncode} on SIGTERM: {server.log()}"
