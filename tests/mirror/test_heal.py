"""Self-healing from a mirror, as ZFS does: `chunkvol scrub` finds every damaged live record
and rewrites it from a mirror's good copy; a read that meets one heals it too, or fails with
EIO where no mirror has it. The heal survives a block-map rebuild."""

import errno
import json
import os
import shutil

import nbd

from chunkvol import compaction
from chunkvol.format import chunk_header
from chunkvol.format.record import HEADER_SIZE
from chunkvol.pool import Pool
from tests.support.mirrors import assert_identical, cv, new_source, snapshot_of_volumes, write_history
from tests.support.nodes import Receiving, free_port, joined

MiB = 1 << 20


def _damage_live_records(path, count):
    """Flip a payload byte in `count` live records of volume v; returns their addresses."""
    with Pool.open(path) as pool:
        with pool.lock:
            pool.checkpoint()
        live = sorted(compaction.live_records(pool).items())
        chosen = [item for item in live if item[1] > 4096][:count]
        paths = {address: pool.chunks.get(chunk_header.split_address(address)[0]).path for address, _ in chosen}
    for address, stored in chosen:
        offset = chunk_header.split_address(address)[1] + HEADER_SIZE + stored - 100
        with open(paths[address], "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)
            handle.seek(offset)
            handle.write(bytes([byte[0] ^ 0x24]))
    return [address for address, _ in chosen]


def _mirrored(tmp_path):
    source = new_source(tmp_path)
    write_history(source, 21, rounds=1)
    mirror = str(tmp_path / "mirror")
    cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}")
    cv(source, "mirror", "sync", "m")
    return source, mirror, snapshot_of_volumes(source)


def test_scrub_heals_damaged_records_from_a_mirror_and_the_heal_survives_a_rebuild(tmp_path):
    source, mirror, before = _mirrored(tmp_path)
    damaged = _damage_live_records(source, 3)
    report = json.loads(cv(source, "scrub", "--json").stdout)
    assert report["damaged"] == 3 and len(report["healed"]) == 3 and report["not_healed"] == [], report
    assert {row["from"] for row in report["healed"]} == {"m"}
    assert snapshot_of_volumes(source) == before
    again = json.loads(cv(source, "scrub", "--json").stdout)
    assert again["healed"] == [] and len(again["damaged_but_unused"]) == 3, again
    shutil.rmtree(os.path.join(source, "index"))  # rebuilt from the log: through the base
    Pool.open(source).close()
    assert snapshot_of_volumes(source) == before
    assert_identical(source, mirror)
    assert len(damaged) == 3


def test_a_read_heals_what_it_meets(tmp_path, server_factory):
    source, mirror, before = _mirrored(tmp_path)
    _damage_live_records(source, 2)
    server = server_factory(source)
    handle = server.connect("v")
    assert handle.pread(len(before["v"]), 0) == before["v"]
    handle.shutdown()
    server.stop()
    report = json.loads(cv(source, "scrub", "--json").stdout)
    assert report["healed"] == [] and report["not_healed"] == [], report


def test_without_a_good_copy_reads_fail_and_scrub_says_so(tmp_path, server_factory):
    source = new_source(tmp_path)
    write_history(source, 22, rounds=1)
    damaged = _damage_live_records(source, 1)
    result = cv(source, "scrub", check=False)
    assert result.returncode == 6 and "NOT healed" in result.stdout, (result.stdout, result.stderr)
    server = server_factory(source)
    handle = server.connect("v")
    failures = []
    for offset in range(0, 48 * MiB, MiB):
        try:
            handle.pread(MiB, offset)
        except nbd.Error as error:
            failures.append(error.errnum)
    assert failures and set(failures) == {errno.EIO}, failures
    assert damaged


def test_scrub_heals_from_a_node_mirror_over_tls(tmp_path):
    source = new_source(tmp_path)
    write_history(source, 23, rounds=1)
    node = joined(tmp_path, source)
    port = free_port()
    receiving = Receiving(node, port, str(tmp_path / "receive.log")).start()
    try:
        cv(source, "mirror", "add", "far", "--to", f"node:127.0.0.1:{port}")
        cv(source, "mirror", "sync", "far")
        before = snapshot_of_volumes(source)
        _damage_live_records(source, 2)
        report = json.loads(cv(source, "scrub", "--json").stdout)
        assert len(report["healed"]) == 2 and {row["from"] for row in report["healed"]} == {"far"}, report
        assert snapshot_of_volumes(source) == before
    finally:
        receiving.kill()
