"""Mirrors to object stores (Ceph RADOS and S3 through radosgw, both real, from the lab in
tools/objstore_lab.py), `restore` from a store alone, and tiering (evicted chunks read back
through the local cache), as a user runs them: the chunkvol command, `chunkvol serve`, real
NBD clients, kill -9.
"""

import json
import os
import random
import shutil
import signal
import time

import nbd
import pytest
import rados

from chunkvol import history
from chunkvol.format import evicted, segment
from chunkvol.mirror import config as mirror_config
from chunkvol.pool import Pool
from tests.support.mirrors import Serve, cv, everything, new_source, uuid_of, write_history
from tests.support.multimaster_sim import pool_pair
from tests.support.objstore_lab import Tampering, rados_url, s3_client, s3_url
from tests.support.server import ENVIRONMENT, chunkvol

MiB = 1 << 20


def restore(url, path, pool_uuid, *more, check=True):
    return chunkvol("restore", "--from", url, "--pool", path, "--pool-uuid", pool_uuid, *more, check=check)


def segment_names(lab, pool_uuid):
    listing = s3_client(lab).list_objects_v2(Bucket=lab["s3_bucket"], Prefix=f"chunkvol/{pool_uuid}/log/")
    return sorted(item["Key"] for item in listing.get("Contents", ()))


# ---- mirror, destroy, restore ---------------------------------------------------------------

def test_a_pool_comes_back_whole_from_rados_and_from_s3(store_env, tmp_path):
    lab = store_env
    source = new_source(tmp_path)
    write_history(source, 11)
    cv(source, "mirror", "add", "r", "--to", rados_url(lab))
    cv(source, "mirror", "add", "s", "--to", s3_url(lab))
    for name in ("r", "s"):
        assert "shipped" in cv(source, "mirror", "sync", name).stdout
    write_history(source, 12, rounds=1, first=False)  # more segments, chained to the first ones
    for name in ("r", "s"):
        cv(source, "mirror", "sync", name)
        row = json.loads(cv(source, "mirror", "status", name, "--json").stdout)
        assert (row["bytes_behind"], row["state"], row["last_error"]) == (0, "idle", None), row
    pool_uuid = uuid_of(source)
    expected = everything(source)
    assert len(expected) > 10
    shutil.rmtree(source)  # the machine is gone; only the stores remain

    for name, url in (("from-rados", rados_url(lab)), ("from-s3", s3_url(lab))):
        target = str(tmp_path / name)
        report = json.loads(restore(url, target, pool_uuid, "--json").stdout)
        assert report["volumes"] == ["c", "v", "z"] and report["segments"] >= 2 and report["bytes"] > 10 * MiB
        assert (report["encrypted"], report["key_fingerprint"]) == (False, None)
        restored = everything(target)
        assert sorted(restored) == sorted(expected)
        assert [point for point in expected if restored[point] != expected[point]] == []
        assert not os.path.exists(target + ".restoring")
        # A restored pool is a writable pool of a node of its own.
        assert Pool.read_metadata(target).get("role", "primary") == "primary"
        cv(target, "volume", "create", "new", "--size", "4M")
        assert cv(target, "check").returncode == 0


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "encrypted"])
def test_restore_until_a_time_stops_at_the_flush_point_before_it(store_env, tmp_path, keyed):
    lab = store_env
    source = str(tmp_path / "src")
    key = ("--key", str(tmp_path / "offsite.key")) if keyed else ()
    if keyed:
        chunkvol("key", "generate", key[1])
    cv(source, "init", "--chunk-size", "16M")
    cv(source, "volume", "create", "v", "--size", "8M")
    cv(source, "mirror", "add", "s", "--to", s3_url(lab), *key)
    rng = random.Random(5)
    states = []
    with Pool.open(source) as pool:
        volume = pool.volume("v")
        for round_number in range(4):
            volume.write(rng.randbytes(MiB), round_number * MiB)
            volume.write(rng.randbytes(65536), 7 * MiB)
            pool.flush()
            buffer = bytearray(8 * MiB)
            volume.read(buffer, 0)
            states.append((pool.committed_stamp, bytes(buffer)))
            time.sleep(0.01)
    cv(source, "mirror", "sync", "s")
    for index in (0, 2):
        stamp, content = states[index]
        target = str(tmp_path / f"until{index}")
        report = json.loads(restore(s3_url(lab), target, uuid_of(source), "--until",
                                    history.format_point(stamp), "--json", *key).stdout)
        assert report["as_of"] == history.format_point(stamp)
        with Pool.open(target, readonly=True) as pool:
            buffer = bytearray(8 * MiB)
            pool.volume("v").read(buffer, 0)
            assert bytes(buffer) == content


# ---- what the store may do wrong ------------------------------------------------------------

def _shipped_in_segments(lab, tmp_path, name="src", segments=4):
    """A pool mirrored to S3 (and RADOS) in several segments."""
    source = str(tmp_path / name)
    cv(source, "init", "--chunk-size", "16M")
    cv(source, "volume", "create", "v", "--size", "16M")
    cv(source, "mirror", "add", "s", "--to", s3_url(lab))
    cv(source, "mirror", "add", "r", "--to", rados_url(lab))
    rng = random.Random(name)
    for _ in range(segments):
        with Pool.open(source) as pool:
            pool.volume("v").write(rng.randbytes(2 * MiB), rng.randrange(0, 14) * MiB)
            pool.flush()
        cv(source, "mirror", "sync", "s")
        cv(source, "mirror", "sync", "r")
    return source


def test_tampered_swapped_stale_or_missing_segments_are_named_and_nothing_is_restored(store_env, tmp_path):
    lab = store_env
    source = _shipped_in_segments(lab, tmp_path)
    other = _shipped_in_segments(lab, tmp_path, "other", segments=2)
    pool_uuid = uuid_of(source)
    names = segment_names(lab, pool_uuid)
    assert len(names) == 4
    store = Tampering(lab, names)
    target = str(tmp_path / "restored")

    def refused(expected_code, *fragments):
        result = restore(s3_url(lab), target, pool_uuid, check=False)
        assert result.returncode == expected_code, result.stderr
        for fragment in fragments:
            assert fragment in result.stderr, result.stderr
        assert not os.path.exists(target) and not os.path.exists(target + ".restoring")

    # A flipped bit in a payload.
    damaged = bytearray(store.originals[names[1]])
    damaged[segment.HEADER_SIZE + 5000] ^= 0x40
    store.put(names[1], bytes(damaged))
    refused(6, "segment payload checksum mismatch", names[1])
    store.mended()
    # A segment gone.
    store.delete(names[2])
    first, last = segment.parse_name(names[2])[2:]
    refused(6, "is missing", f"node {segment.parse_name(names[2])[1]}'s segments are incomplete")
    store.mended()
    # Two segments' bodies swapped.
    store.put(names[1], store.originals[names[2]])
    store.put(names[2], store.originals[names[1]])
    refused(6, "is not the one its name says")
    store.mended()
    # A segment of another pool under this pool's name.
    store.put(names[0], store.get(segment_names(lab, uuid_of(other))[0]))
    refused(6, "is not the one its name says")
    store.mended()
    # A stale segment: well formed, right name and sequences, but not the one the chain continued from.
    raw = store.originals[names[1]]
    header = segment.decode_header(raw, names[1])
    records = segment.split_records(raw, header, names[1])
    stale, _ = segment.encode(bytes.fromhex(pool_uuid), header.origin, [bytes(r) for r in records],
                              header.previous_sequence, header.previous_digest ^ 1)
    store.put(names[1], stale)
    refused(6, "does not follow")
    store.mended()
    # The pool's description gone: nothing to restore from.
    description = f"chunkvol/{pool_uuid}/pool.json"
    saved = store.get(description)
    store.delete(description)
    refused(3, "holds no pool")
    store.put(description, saved)
    # The store holds several pools: a restore must be told which.
    result = chunkvol("restore", "--from", s3_url(lab), "--pool", target, check=False)
    assert result.returncode == 2 and "--pool-uuid" in result.stderr
    # A segment gone from RADOS is named too.
    cluster = rados.Rados(conffile=lab["ceph_conf"])
    cluster.connect(timeout=10)
    try:
        with cluster.open_ioctx(lab["rados_pool"]) as ioctx:
            ioctx.remove_object(names[0])
        result = restore(rados_url(lab), target, pool_uuid, check=False)
        assert result.returncode == 6 and "at the start of the chain" in result.stderr, result.stderr
    finally:
        cluster.shutdown()
    # Mended, it restores.
    restore(s3_url(lab), target, pool_uuid)
    assert everything(target) == everything(source)


def test_store_faults_never_block_local_writes(store_env, tmp_path, serves):
    lab = store_env
    pool = str(tmp_path / "src")
    cv(pool, "init", "--chunk-size", "16M")
    cv(pool, "volume", "create", "v", "--size", "32M")
    wrong = dict(ENVIRONMENT, AWS_SECRET_ACCESS_KEY="not-the-secret")
    result = cv(pool, "mirror", "add", "s", "--to", s3_url(lab), check=False, env=wrong)
    assert result.returncode == 1 and "access denied" in result.stderr, result.stderr
    result = cv(pool, "mirror", "add", "s", "--to", "s3:http://127.0.0.1:9/chunkvol", check=False)
    assert result.returncode == 1 and "retried for 3 s" in result.stderr, result.stderr
    result = cv(pool, "mirror", "add", "s", "--to", "s3:not-a-url", check=False)
    assert result.returncode == 2
    cv(pool, "mirror", "add", "s", "--to", s3_url(lab))

    # The server runs with credentials the store refuses: clients write at full speed anyway.
    for key, value in wrong.items():
        ENVIRONMENT[key] = value
    serve = Serve(pool, str(tmp_path / "nbd.sock"), str(tmp_path / "serve.log")).start()
    serves.append(serve)
    rng = random.Random(3)
    handle = serve.connect()
    for _ in range(40):
        handle.pwrite(rng.randbytes(MiB), rng.randrange(0, 31) * MiB)
    handle.flush()
    deadline = time.monotonic() + 30
    while True:
        row = json.loads(cv(pool, "mirror", "status", "s", "--json").stdout)
        if row["last_error"]:
            break
        assert time.monotonic() < deadline, row
        time.sleep(0.2)
    assert "access denied" in row["last_error"] and row["bytes_behind"] > 0
    handle.shutdown()
    serve.stop()

    # Right credentials: it catches up by itself, and a restore has every flushed write.
    ENVIRONMENT["AWS_SECRET_ACCESS_KEY"] = lab["secret_key"]
    serve.start()
    deadline = time.monotonic() + 60
    while True:
        row = json.loads(cv(pool, "mirror", "status", "s", "--json").stdout)
        if row["bytes_behind"] == 0 and row["state"] == "idle":
            break
        assert time.monotonic() < deadline, row
        time.sleep(0.2)
    serve.stop()
    target = str(tmp_path / "restored")
    restore(s3_url(lab), target, uuid_of(pool))
    assert everything(target) == everything(pool)


# ---- tiering ------------------------------------------------------------------------------

def _read_all(handle, size):
    return b"".join(handle.pread(MiB, offset) for offset in range(0, size, MiB))


def test_evicted_chunks_read_back_through_the_cache_after_kill9(store_env, tmp_path, serves):
    lab = store_env
    pool = str(tmp_path / "src")
    cv(pool, "init", "--chunk-size", "16M")
    cv(pool, "volume", "create", "v", "--size", "48M")
    cv(pool, "mirror", "add", "s", "--to", s3_url(lab))
    rng = random.Random(9)
    model = bytearray(48 * MiB)
    # Written before the server starts: its shipper would otherwise race the refusal below.
    with Pool.open(pool) as opened:
        volume = opened.volume("v")
        for offset in range(0, 48 * MiB, MiB):  # 48 MiB of data: three chunks and a bit
            data = rng.randbytes(MiB)
            volume.write(data, offset)
            model[offset:offset + MiB] = data
        for _ in range(20):
            offset = rng.randrange(0, 47) * MiB
            data = rng.randbytes(MiB)
            volume.write(data, offset)
            model[offset:offset + MiB] = data
        opened.flush()

    # Not shipped yet: refused. Shipped: evicted while the server runs.
    result = cv(pool, "chunk", "evict", "1", check=False)
    assert result.returncode == 2 and "has not shipped" in result.stderr, result.stderr
    serve = Serve(pool, str(tmp_path / "nbd.sock"), str(tmp_path / "serve.log")).start()
    serves.append(serve)
    cv(pool, "mirror", "sync", "s")
    result = cv(pool, "chunk", "evict", "--keep-under", "24M")
    assert "evicted to" in result.stdout
    rows = json.loads(cv(pool, "chunk", "list", "--json").stdout)
    evicted_ids = [row["id"] for row in rows if row["where"] == "evicted"]
    assert len(evicted_ids) >= 2 and evicted_ids[0] == 1
    assert sum(row["size"] for row in rows if row["where"] == "local") <= 24 * MiB + 16 * MiB
    last = max(row["id"] for row in rows)
    result = cv(pool, "chunk", "evict", str(last), check=False)
    assert result.returncode == 2 and "being written" in result.stderr

    handle = serve.connect()
    assert _read_all(handle, 48 * MiB) == bytes(model)
    handle.shutdown()
    serve.kill()  # kill -9: the eviction is durable, the reads still come from the store
    serve.start()
    handle = serve.connect()
    assert _read_all(handle, 48 * MiB) == bytes(model)
    handle.shutdown()

    # A damaged cache is fetched again; a tampered object is refused, never returned.
    cache = os.path.join(pool, "chunks", f"chunk-{evicted_ids[0]:016x}.cache")
    with open(cache, "r+b") as damaged:
        damaged.write(b"\xff" * 8192)
    handle = serve.connect()
    assert _read_all(handle, 48 * MiB) == bytes(model)
    handle.shutdown()
    serve.stop()
    client = s3_client(lab)
    metadata = Pool.read_metadata(pool)
    piece = evicted.piece_name(bytes.fromhex(metadata["pool_uuid"]), metadata["node_id"], evicted_ids[0], 0)
    original = client.get_object(Bucket=lab["s3_bucket"], Key=piece)["Body"].read()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 1
    client.put_object(Bucket=lab["s3_bucket"], Key=piece, Body=bytes(tampered))
    os.unlink(cache)
    result = cv(pool, "check", check=False)
    assert result.returncode == 6 and "fail their checksum" in result.stderr + result.stdout
    serve.start()
    handle = serve.connect()
    errors = 0
    for offset in range(0, 48 * MiB, MiB):
        try:
            assert handle.pread(MiB, offset) == bytes(model[offset:offset + MiB])
        except nbd.Error:
            errors += 1
    assert errors >= 1  # the blocks in the tampered unit: EIO, not other data
    handle.shutdown()
    client.put_object(Bucket=lab["s3_bucket"], Key=piece, Body=original)
    handle = serve.connect()
    assert _read_all(handle, 48 * MiB) == bytes(model)

    # The policy: serve's shipper evicts as it ships.
    cv(pool, "chunk", "policy", "--keep-under", "16M")
    for offset in range(0, 40 * MiB, MiB):
        data = rng.randbytes(MiB)
        handle.pwrite(data, offset)
        model[offset:offset + MiB] = data
    handle.flush()
    deadline = time.monotonic() + 60
    while True:
        rows = json.loads(cv(pool, "chunk", "list", "--json").stdout)
        if len([row for row in rows if row["where"] == "evicted"]) > len(evicted_ids):
            break
        assert time.monotonic() < deadline, (rows, open(serve.log_path).read()[-3000:])
        time.sleep(0.3)
    assert _read_all(handle, 48 * MiB) == bytes(model)
    handle.shutdown()
    serve.kill(signal.SIGTERM)


def test_nodes_of_one_pool_evict_to_one_bucket_and_compaction_deletes_what_it_frees(store_env, tmp_path,
                                                                                   monkeypatch):
    """Chunk ids are per node: two nodes of one pool that both evict their chunk 1 to one
    bucket must not share its objects. Compacting an evicted chunk away deletes its objects
    from the store (nothing refers to them any more), and only those."""
    lab = store_env
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, ENVIRONMENT[key])  # for the pools opened in this process
    client = s3_client(lab)
    nodes = pool_pair(tmp_path)
    models = {}
    for index, node in enumerate(nodes):  # two nodes of one pool, each with its own volume
        node.close()
        mirror_config.save_mirrors(node.path, {})
        node.open()
        node.pool.create_volume("v", 40 * MiB)
        data = random.Random(index).randbytes(36 * MiB)
        node.pool.volume("v").write(data, 0)
        node.pool.flush()
        models[node.path] = data + bytes(4 * MiB)
        node.close()
        cv(node.path, "mirror", "add", "s", "--to", s3_url(lab))
        cv(node.path, "mirror", "sync", "s")
        assert "evicted to" in cv(node.path, "chunk", "evict", "1").stdout

    def pieces(node):
        prefix = evicted.chunk_prefix(node.pool_uuid, node.node_id, 1)
        listing = client.list_objects_v2(Bucket=lab["s3_bucket"], Prefix=prefix)
        return [item["Key"] for item in listing.get("Contents", [])]

    def read_back(node):
        with Pool.open(node.path) as pool:
            buffer = bytearray(40 * MiB)
            pool.volume("v").read(buffer, 0)
            return bytes(buffer)

    for node in nodes:
        assert pieces(node), "chunk 1's pieces should be in the bucket"
        assert read_back(node) == models[node.path]

    # Node 0 overwrites everything and lets its history go: chunk 1 is dead, and compacted.
    a, b = nodes
    with Pool.open(a.path) as pool:
        data = random.Random(7).randbytes(36 * MiB)
        pool.volume("v").write(data, 0)
        pool.flush()
        models[a.path] = data + bytes(4 * MiB)
    cv(a.path, "mirror", "sync", "s")
    cv(a.path, "prune", "--keep", "0s")
    report = json.loads(cv(a.path, "compact", "--json").stdout)
    assert 1 in report["victims"] and report["store_objects_deleted"] >= 1 and not report["store_objects_left"]
    assert pieces(a) == []
    assert pieces(b), "the other node's chunk 1 stays"
    for node in nodes:
        assert read_back(node) == models[node.path]
    assert cv(a.path, "check").returncode == 0
