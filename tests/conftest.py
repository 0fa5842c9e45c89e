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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(session, config, items):
    """The modules that use the object-store lab run last, together: the lab (a Ceph cluster
    and an S3 gateway) starts once, for them, and is not left running under the tests of
    real clients (qemu, user-mode Linux), which need both cores. Order is kept otherwise.

    Under pytest-xdist (`make test` runs two workers, --dist loadgroup) each of those two
    sets is one group, run by one worker: one lab for the session, and one guest booting
    at a time. They go first, one to each worker, and the rest fills in behind them."""
    lab_modules = {item.module for item in items
                   if "objstore_lab" in item.fixturenames or item.get_closest_marker("objstore_lab")}
    if hasattr(config, "workerinput"):
        # Longest first: each worker starts with one of the two groups, then both share the rest.
        items.sort(key=lambda item: (item.module not in lab_modules, item.path.parent.name != "realclients"))
    else:
        items.sort(key=lambda item: item.module in lab_modules)
    for item in items:
        if item.module in lab_modules:
            item.add_marker(pytest.mark.xdist_group("objstore_lab"))
        elif item.path.parent.name == "realclients":
            item.add_marker(pytest.mark.xdist_group("realclients"))


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long by design (minutes of partition or load); run by "
                                       "`make test-soak`, left out of `make test`")
    config.addinivalue_line("markers", "objstore_lab: the module asks for the object-store lab at run time "
                                       "(request.getfixturevalue), so it runs with the lab's other users")
