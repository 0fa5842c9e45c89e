"""`chunkvol status`, `check [--repair]` and `inspect`, as a user runs them."""

import json
import os

import lmdb

from chunkvol.format import group_map
from chunkvol.pool import Pool
from tests.support.server import chunkvol


def _write(path, data, offset, flush=True):
    with Pool.open(path) as pool:
        pool.volume("disk0").write(data, offset)
        if flush:
            pool.flush()


def _first_extent(path):
    """(chunk file, offset) of the first EXTENT record, found with `inspect chunk`."""
    listing = chunkvol("--pool", path, "inspect", "chunk", "1", "-n", "100").stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[1] == "EXTENT":
            return os.path.join(path, "chunks", "chunk-0000000000000001.cvc"), int(fields[0])
    raise AssertionError(listing)


def test_status_reports_volumes_chunks_and_space(pool_path):
    _write(pool_path, os.urandom(1 << 20), 0)
    _write(pool_path, os.urandom(1 << 20), 0)  # the first MiB is history now
    report = json.loads(chunkvol("--pool", pool_path, "status", "--json").stdout)
    volume = report["volumes"]["disk0"]
    assert volume["size"] == 64 << 20
    assert volume["mapped_bytes"] == 1 << 20
    assert report["log"]["live_bytes"] >= 1 << 20
    assert report["log"]["history_bytes"] >= 1 << 20
    assert report["chunks"][0]["written"] == report["log"]["written_bytes"]
    text = chunkvol("--pool", pool_path, "status").stdout
    assert "disk0" in text and "CHUNK" in text


def test_status_of_compressed_volume_shows_ratio(tmp_path):
    path = str(tmp_path / "pool")
    chunkvol("--pool", path, "init", "--chunk-size", "16M")
    chunkvol("--pool", path, "volume", "create", "disk0", "--size", "64M", "--compression", "zstd")
    _write(path, b"compressible text " * 60000, 0)
    report = json.loads(chunkvol("--pool", path, "status", "--json").stdout)
    assert report["volumes"]["disk0"]["compression_ratio"] > 5


def test_check_clean_pool_exits_zero(pool_path):
    _write(pool_path, os.urandom(300_000), 4096)
    result = chunkvol("--pool", pool_path, "check")
    assert "no damage found" in result.stdout


def test_check_names_file_and_offset_of_a_damaged_record(pool_path):
    _write(pool_path, os.urandom(65536), 0)
    _write(pool_path, os.urandom(65536), 1 << 20)  # a later commit proves the first durable
    path, offset = _first_extent(pool_path)
    with open(path, "r+b") as handle:
        handle.seek(offset + 72 + 16 * 8 + 100)
        byte = handle.read(1)
        handle.seek(offset + 72 + 16 * 8 + 100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = chunkvol("--pool", pool_path, "check", "--json", check=False)
    assert result.returncode == 6, result.stderr
    report = json.loads(result.stdout)
    assert report["log_damage"][0]["file"] == path
    assert report["log_damage"][0]["offset"] == offset
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_check_finds_a_damaged_block_map_and_repair_rebuilds_it(pool_path):
    data = os.urandom(1 << 20)
    _write(pool_path, data, 0)
    environment = lmdb.open(os.path.join(pool_path, "index"), max_dbs=4)
    groups = environment.open_db(b"groups")
    with environment.begin(write=True, db=groups) as txn:  # lose the map of group 3
        cursor = txn.cursor()
        assert cursor.set_range(group_map.newest_key(1, 3))
        cursor.delete()
    environment.close()

    result = chunkvol("--pool", pool_path, "check", check=False)
    assert result.returncode == 6
    assert "group 3" in result.stdout

    repaired = chunkvol("--pool", pool_path, "check", "--repair", check=False)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "rebuilt" in repaired.stdout
    assert "no damage found" in chunkvol("--pool", pool_path, "check").stdout
    with Pool.open(pool_path) as pool:
        buffer = bytearray(1 << 20)
        pool.volume("disk0").read(buffer, 0)
        assert buffer == data


def test_check_repair_refused_while_served(pool_path, server_factory):
    server_factory(pool_path)
    result = chunkvol("--pool", pool_path, "check", "--repair", check=False)
    assert result.returncode == 5
    assert "stop the server" in result.stderr
    assert chunkvol("--pool", pool_path, "check").returncode == 0  # read-only check beside it


def test_inspect_every_structure(pool_path):
    _write(pool_path, b"\x07" * 65536, 8 << 20)
    pool_json = json.loads(chunkvol("--pool", pool_path, "inspect", "pool").stdout)
    assert pool_json["format"] == "chunkvol-pool"
    checkpoint = json.loads(chunkvol("--pool", pool_path, "inspect", "checkpoint").stdout)
    assert checkpoint["log_address"].startswith("1:")
    path, offset = _first_extent(pool_path)
    record = json.loads(chunkvol("--pool", pool_path, "inspect", "record", f"1:{offset}").stdout)
    assert record["type"] == "EXTENT" and record["offset_bytes"] == 8 << 20
    assert record["payload_check"] == "ok"
    group = json.loads(chunkvol("--pool", pool_path, "inspect", "map", "disk0", "8M", "--all").stdout)
    assert group["group"] == 128 and len(group["versions"]) == 1
    assert group["live"]["records"][0]["at"] == f"1:{offset}"
    bad = chunkvol("--pool", pool_path, "inspect", "record", "nonsense", check=False)
    assert bad.returncode == 2 and "CHUNK:OFFSET" in bad.stderr
