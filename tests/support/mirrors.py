"""Mirrors as the tests drive them: a source pool with history, the `chunkvol` command on a
pool, every byte of a pool to compare a mirror with, and `chunkvol serve` in the background.

    from tests.support.mirrors import Serve, assert_identical, cv, new_source, write_history

The `serves` fixture that stops every Serve a test started is in tests/mirror/conftest.py.
"""

import json
import os
import random
import signal
import subprocess
import time

import nbd

from chunkvol import history
from chunkvol.mirror.source import LogSource
from chunkvol.pool import Pool
from chunkvol.storage.files import LocalFiles
from tests.support.server import CHUNKVOL, ENVIRONMENT, chunkvol

MiB = 1 << 20


def cv(pool, *arguments, check=True, env=None):
    """`chunkvol --pool POOL ARGUMENTS` (env: the environment, ENVIRONMENT if None)."""
    return chunkvol("--pool", pool, *arguments, check=check, env=env)


def new_source(tmp_path, name="src"):
    path = str(tmp_path / name)
    cv(path, "init", "--chunk-size", "16M")
    cv(path, "volume", "create", "v", "--size", "48M")
    cv(path, "volume", "create", "z", "--size", "16M", "--compression", "zstd")
    return path


def write_history(path, seed, rounds=3, first=True):
    """Writes with flush points, snapshots, a clone, a rollback and a prune, in-process
    (`first`: the first call on this pool; later ones add writes and snapshots only)."""
    rng = random.Random(seed)
    with Pool.open(path) as pool:
        for round_number in range(rounds):
            for name in ("v", "z"):
                volume = pool.volume(name)
                for _ in range(40):
                    size = rng.choice([4096, 5000, 65536, 300_000, MiB])
                    volume.write(rng.randbytes(size), rng.randrange(0, volume.size_bytes - size))
                    if rng.random() < 0.1:
                        pool.flush()
                volume.zero(rng.randrange(0, 8) * MiB, 3 * 4096)
                pool.flush()
            history.create_snapshot(pool, "v", f"s{round_number}" if first else f"r{seed}-{round_number}")
        if not first:
            return
        history.clone(pool, "v@s0", "c")
        pool.volume("c").write(rng.randbytes(8192), 4096)
        pool.flush()
        history.rollback(pool, "z@" + history.format_point(history.history_rows(pool, "z")[1]["stamp"]))
        history.prune(pool, "v", 0)


def everything(path):
    """{point: bytes} for every volume, snapshot and history point of a pool, plus the
    history listings themselves."""
    found = {}
    with Pool.open(path, readonly=True) as pool:
        for name in sorted(pool.volumes):
            points = [name] + [f"{name}@{snapshot}" for snapshot in sorted(pool.snapshots.get(
                pool.volumes[name].volume_id, {}))]
            rows = history.history_rows(pool, name)
            found[f"{name}:history"] = [(row["stamp"], row["bytes_written"]) for row in rows]
            points += [row["point"] for row in rows]
            for point in points:
                volume = pool.volume(point)
                buffer = bytearray(volume.size_bytes)
                volume.read(buffer, 0)
                found[point] = bytes(buffer)
    return found


def assert_identical(source, mirror):
    mine, theirs = everything(source), everything(mirror)
    assert sorted(mine) == sorted(theirs)
    different = [point for point in mine if mine[point] != theirs[point]]
    assert not different, f"differ: {different[:10]}"
    return len(mine)


def snapshot_of_volumes(path):
    """{volume name: bytes} of every live volume of a pool (no snapshots, no history)."""
    contents = {}
    with Pool.open(path, readonly=True) as pool:
        for name in sorted(pool.volumes):
            volume = pool.volume(name)
            buffer = bytearray(volume.size_bytes)
            volume.read(buffer, 0)
            contents[name] = bytes(buffer)
    return contents


def uuid_of(path):
    return Pool.read_metadata(path)["pool_uuid"]


def status(path, name):
    return json.loads(cv(path, "mirror", "status", name, "--json").stdout)


def wait_caught_up(pool, name, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = status(pool, name)
        if row["bytes_behind"] == 0 and row["state"] == "idle":
            return row
        time.sleep(0.2)
    raise AssertionError(f"mirror {name} did not catch up: {row}")


def log_batch(source):
    """(pool fields, records) of the one batch a source's whole log makes."""
    fields = Pool.read_metadata(source)
    reader = LogSource(source, fields, LocalFiles())
    try:
        with Pool.open(source, readonly=True) as pool:
            horizon = pool.writer.position
        batches = list(reader.batches(reader.first_address(), horizon, 1 << 40))
    finally:
        reader.close()
    assert len(batches) == 1
    return fields, batches[0].records


class Serve:
    """`chunkvol serve --socket` as a user runs it (nbdkit and the mirror shipper)."""

    def __init__(self, pool, socket_path, log_path):
        self.pool, self.socket_path, self.log_path = pool, socket_path, log_path
        self.process = None

    def start(self):
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([CHUNKVOL, "--pool", self.pool, "serve", "--socket", self.socket_path],
                                        stdout=log, stderr=log, env=ENVIRONMENT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                handle = nbd.NBD()
                handle.connect_uri(f"nbd+unix:///v?socket={self.socket_path}")
                handle.shutdown()
                return self
            except nbd.Error:
                time.sleep(0.1)
        raise AssertionError(f"serve did not come up: {open(self.log_path).read()[-2000:]}")

    def connect(self, name="v"):
        handle = nbd.NBD()
        handle.connect_uri(f"nbd+unix:///{name}?socket={self.socket_path}")
        return handle

    def kill(self, signum=signal.SIGKILL):
        """The whole session: serve, nbdkit and the shipper (a machine losing power)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)
            self.process.wait(timeout=30)
        self.process = None

    def stop(self):
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
            self.process = None
