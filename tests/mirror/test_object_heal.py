"""Self-healing from object-store mirrors (Ceph RADOS and S3 through radosgw, both real, from
the lab in tools/objstore_lab.py), as a user meets it: a record damaged in a chunk file is
rewritten by `chunkvol scrub` or by the read that meets it, from the segment its origin
shipped to the store; a segment that fails any check in the store is never used.
"""

import errno
import json
import random
import time

import nbd
import pytest

from chunkvol import compaction
from chunkvol.format import chunk_header, record, segment
from chunkvol.format.record import HEADER_SIZE, RecordType
from chunkvol.mirror import config as mirror_config
from chunkvol.objstore import open_store
from chunkvol.pool import Pool
from tests.support.mirrors import Serve, cv, snapshot_of_volumes, uuid_of
from tests.support.multimaster_sim import contents, pool_pair, ship
from tests.support.objstore_lab import rados_url, s3_url
from tests.support.server import ENVIRONMENT

MiB = 1 << 20


@pytest.fixture
def s3_store(store_env, monkeypatch):
    """The lab's bucket through chunkvol's own client, in this process (to tamper with it)."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, ENVIRONMENT[key])
    store = open_store(s3_url(store_env))
    yield store
    store.close()


def _new_pool(tmp_path, seed, mirrors):
    """A pool with a raw volume v and a zstd volume z, mirrored to `mirrors` ({name: target});
    three rounds of writes to blocks written once, each round shipped (a segment per round)."""
    path = str(tmp_path / "src")
    cv(path, "init", "--chunk-size", "16M")
    cv(path, "volume", "create", "v", "--size", "8M")
    cv(path, "volume", "create", "z", "--size", "8M", "--compression", "zstd")
    for name, target in mirrors.items():
        cv(path, "mirror", "add", name, "--to", target)
    rng = random.Random(seed)
    slots = {name: rng.sample(range(32), 24) for name in ("v", "z")}  # 256 KiB each: no overwrites
    for _ in range(3):
        with Pool.open(path) as pool:
            for volume_name in ("v", "z"):
                volume = pool.volume(volume_name)
                for _ in range(8):
                    size = rng.choice([8192, 65536, 200_000])
                    half = rng.randbytes(size // 2)
                    volume.write(half + bytes(size - len(half)), slots[volume_name].pop() * 256 * 1024)
            pool.flush()
        for name in mirrors:
            cv(path, "mirror", "sync", name)
    return path


def _damage(path, count, volume_name=None, origin=None):
    """Flip one payload byte in each of `count` live EXTENT records (of a volume, or written
    by a node); returns {"CHUNK:OFFSET": record header} of those records."""
    chosen = {}
    with Pool.open(path) as pool:
        with pool.lock:
            pool.checkpoint()
        volume_id = pool.volumes[volume_name].volume_id if volume_name else None
        for address, stored in sorted(compaction.live_records(pool).items()):
            header = record.decode_header(pool.writer.read(address, HEADER_SIZE))
            if (header.record_type != RecordType.EXTENT or (volume_id and header.volume_id != volume_id)
                    or (origin and header.origin_node != origin)):
                continue
            chunk_id, offset = chunk_header.split_address(address)
            with open(pool.chunks.get(chunk_id).path, "r+b") as handle:
                handle.seek(offset + HEADER_SIZE + stored // 2)
                byte = handle.read(1)[0]
                handle.seek(offset + HEADER_SIZE + stored // 2)
                handle.write(bytes([byte ^ 0x81]))
            chosen[f"{chunk_id}:{offset}"] = header
            if len(chosen) == count:
                break
    assert len(chosen) == count
    return chosen


def _scrub(path, check=True):
    result = cv(path, "scrub", "--json", check=check)
    return json.loads(result.stdout), result.returncode


def _healed_from(report):
    return {row["record"]: row["from"] for row in report["healed"]}


def test_scrub_heals_raw_and_zstd_records_from_rados_then_from_s3(store_env, tmp_path):
    lab = store_env
    path = _new_pool(tmp_path, 1, {"r": rados_url(lab), "s": s3_url(lab)})
    before = snapshot_of_volumes(path)
    # A store that is away (its mirror looked at first) is given up once for the whole pass.
    mirrors = mirror_config.load_mirrors(path)
    mirrors["a-away"] = dict(mirrors["s"], to="s3:http://127.0.0.1:9/chunkvol")
    mirror_config.save_mirrors(path, mirrors)

    damaged = {**_damage(path, 3, "v"), **_damage(path, 3, "z")}
    started = time.monotonic()
    report, _ = _scrub(path)
    assert time.monotonic() - started < 8, "the store that is away (3 s of retries) was waited for more than once"
    assert report["damaged"] == 6 and report["not_healed"] == [], report
    assert _healed_from(report) == {where: "r" for where in damaged}
    assert snapshot_of_volumes(path) == before
    again, _ = _scrub(path)
    assert again["healed"] == [] and again["not_healed"] == [] and len(again["damaged_but_unused"]) == 6, again

    # Without the RADOS mirror, other records heal from S3.
    cv(path, "mirror", "remove", "r")
    cv(path, "mirror", "remove", "a-away")
    damaged = {**_damage(path, 2, "v"), **_damage(path, 2, "z")}
    report, _ = _scrub(path)
    assert _healed_from(report) == {where: "s" for where in damaged} and report["not_healed"] == [], report
    assert snapshot_of_volumes(path) == before
    again, _ = _scrub(path)
    assert again["healed"] == [] and again["not_healed"] == [], again


def test_a_served_read_heals_from_the_store(store_env, tmp_path, serves):
    lab = store_env
    path = _new_pool(tmp_path, 2, {"r": rados_url(lab)})
    before = snapshot_of_volumes(path)
    damaged = {**_damage(path, 2, "v"), **_damage(path, 1, "z")}
    serve = Serve(path, str(tmp_path / "nbd.sock"), str(tmp_path / "serve.log")).start()
    serves.append(serve)
    for name in ("v", "z"):
        handle = serve.connect(name)
        assert handle.pread(len(before[name]), 0) == before[name]
        handle.shutdown()
    serve.stop()
    report, _ = _scrub(path)
    assert report["healed"] == [] and report["not_healed"] == [], report
    assert sorted(row["record"] for row in report["damaged_but_unused"]) == sorted(damaged)


def _segment_holding(store, pool_uuid, header):
    for name in store.list(segment.origin_prefix(pool_uuid, header.origin_node)):
        first, last = segment.parse_name(name)[2:]
        if first <= header.origin_sequence <= last:
            return name
    raise AssertionError("no segment holds the record")


def test_a_bad_segment_in_the_store_is_never_used(store_env, s3_store, tmp_path, serves):
    lab, store = store_env, s3_store
    path = _new_pool(tmp_path, 3, {"s": s3_url(lab)})
    before = snapshot_of_volumes(path)
    damaged = _damage(path, 1, "v")
    (where, header), = damaged.items()
    pool_uuid = bytes.fromhex(uuid_of(path))
    name = _segment_holding(store, pool_uuid, header)
    original = store.get(name)
    decoded = segment.decode_header(original, name)
    records = [bytes(raw) for raw in segment.split_records(original, decoded, name)]
    index = next(i for i, raw in enumerate(records)
                 if record.decode_header(raw[:HEADER_SIZE]).origin_sequence == header.origin_sequence)
    # The record changed and the segment's checksums made again: the record's own check fails.
    forged = bytearray(records[index])
    forged[-50] ^= 0x10
    forged_segment, _ = segment.encode(pool_uuid, header.origin_node, records[:index] + [bytes(forged)]
                                       + records[index + 1:], decoded.previous_sequence, decoded.previous_digest)
    flipped = bytearray(original)
    flipped[len(flipped) - 7] ^= 0x02
    tampered = [("gone", None), ("a forged record", forged_segment), ("cut short", original[:-1]),
                ("grown", original + b"\0"), ("a flipped byte", bytes(flipped))]  # the last one stays while served
    try:
        for what, data in tampered:
            if data is None:
                store.delete(name)
            else:
                store.put(name, data)
            report, code = _scrub(path, check=False)
            assert code == 6 and report["healed"] == [], (what, report)
            assert [row["record"] for row in report["not_healed"]] == [where], (what, report)
        # Read through a real server: EIO, never other bytes.
        serve = Serve(path, str(tmp_path / "nbd.sock"), str(tmp_path / "serve.log")).start()
        serves.append(serve)
        handle = serve.connect("v")
        with pytest.raises(nbd.Error) as failed:
            handle.pread(header.length_bytes, header.offset_bytes)
        assert failed.value.errnum == errno.EIO
        handle.shutdown()
        serve.stop()
    finally:
        store.put(name, original)
    # Mended in the store, the same record heals.
    report, _ = _scrub(path)
    assert _healed_from(report) == {where: "s"}, report
    assert snapshot_of_volumes(path) == before


def test_a_record_of_another_node_heals_from_that_nodes_segments(store_env, tmp_path):
    lab = store_env
    a, b = pool_pair(tmp_path)
    try:
        a.pool.create_volume("mm", 4 * MiB, mode="multi-master")
        ship(a, b)
        rng = random.Random(4)
        for node, first in ((a, 0), (b, 2 * MiB)):
            volume = node.pool.volume("mm")
            for _ in range(10):
                volume.write(rng.randbytes(65536), first + rng.randrange(0, 31) * 65536)
            node.pool.flush()
        ship(a, b)
        ship(b, a)
        expected = contents(b)
        assert contents(a) == expected
    finally:
        a.close()
        b.close()
    # Only B ships to the store; A has it as a mirror too, so it may heal from it.
    cv(b.path, "mirror", "add", "s", "--to", s3_url(lab))
    cv(b.path, "mirror", "sync", "s")
    cv(a.path, "mirror", "add", "s", "--to", s3_url(lab))
    damaged = _damage(a.path, 2, origin=b.node_id)
    report, _ = _scrub(a.path)
    assert _healed_from(report) == {where: "s" for where in damaged} and report["not_healed"] == [], report
    a.open()
    try:
        assert contents(a) == expected
    finally:
        a.close()
