"""Shared fixtures: a fresh pool, a real nbdkit server on it that is always stopped, and the
object-store lab (`objstore_lab`, one for the whole session: tests/support/objstore_lab.py).

Helpers shared by test modules are in tests/support/; fixtures of one area are in that area's
conftest.py (tests/mirror/conftest.py: `serves`, `store_env`)."""

import os

import pytest

from tests.support.objstore_lab import objstore_lab  # noqa: F401 (a fixture)
from tests.support.server import NbdServer, chunkvol

os.environ["PATH"] = "/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", "")


@pytest.fixture
def pool_path(tmp_path):
    """A pool with 16 MiB chunks and one 64 MiB volume `disk0`."""
    path = str(tmp_path / "pool")
    chunkvol("--pool", path, "init", "--chunk-size", "16M")
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M")
    return path


@pytest.fixture
def server_factory(tmp_path):
    """Make servers on pools; every one is stopped at the end of the test."""
    servers = []

    def make(pool, *keys, name="nbd"):
        server = NbdServer(pool, str(tmp_path / f"{name}{len(servers)}.sock"), *keys)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def server(pool_path, server_factory):
    return server_factory(pool_path)
