"""The shortest path a user takes: create a pool, serve it, write, flush, restart, read."""

import os

from tests.support.server import NbdServer


def test_write_flush_restart_read(pool_path, tmp_path):
    data = os.urandom(1 << 20)
    with NbdServer(pool_path, str(tmp_path / "a.sock")) as server:
        handle = server.connect()
        handle.pwrite(data, 12288)
        handle.flush()
        handle.shutdown()
    with NbdServer(pool_path, str(tmp_path / "b.sock")) as server:
        handle = server.connect()
        assert handle.pread(len(data), 12288) == data
        assert handle.pread(12288, 0) == bytes(12288)
        handle.shutdown()
