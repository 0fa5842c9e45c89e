"""Encrypted object-store mirrors (issue 17) against the lab's real RADOS and S3
(tools/objstore_lab.py), through the real `chunkvol` command: the store holds only
ciphertext (every object of it scanned), a restore needs the key and creates nothing without
it, tampering is detected and never returned, and tiering, self-heal and `restore --until`
work through the key.
"""

import json
import os
import random
import stat

import pytest
import rados

from chunkvol.format import evicted, sealed_object, segment, store_marker
from chunkvol.objstore.keys import load_key
from chunkvol.objstore.sealed_store import SealedStore
from chunkvol.pool import Pool
from tests.mirror.test_object_heal import _damage, _healed_from, _scrub
from tests.support.mirrors import Serve, cv, everything, new_source, uuid_of, wait_caught_up, write_history
from tests.support.objstore_lab import Tampering, rados_url, s3_client, s3_url
from tests.support.server import ENVIRONMENT, chunkvol

MiB = 1 << 20
VOLUME_NAME = "payroll-disk-7f3a"  # a name that must never reach the store
SAMPLE_BYTES = 48  # a piece of each known block looked for in every object


def generate_key(tmp_path, name="offsite.key"):
    """(path, fingerprint) of a new key file made by the command."""
    path = str(tmp_path / name)
    shown = json.loads(chunkvol("key", "generate", path, "--json").stdout)
    return path, shown["fingerprint"]


def restore(url, path, pool_uuid, *more, check=True):
    return chunkvol("restore", "--from", url, "--pool", path, "--pool-uuid", pool_uuid, *more, check=check)


def s3_objects(lab, pool_uuid):
    """{name: bytes} of every object of the pool in the bucket."""
    client = s3_client(lab)
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=lab["s3_bucket"],
                                                                 Prefix=f"chunkvol/{pool_uuid}/"):
        for item in page.get("Contents", ()):
            found[item["Key"]] = client.get_object(Bucket=lab["s3_bucket"], Key=item["Key"])["Body"].read()
    return found


def rados_objects(lab, pool_uuid):
    """{name: bytes} of every object of the pool in the RADOS pool."""
    cluster = rados.Rados(conffile=lab["ceph_conf"])
    cluster.connect(timeout=10)
    try:
        with cluster.open_ioctx(lab["rados_pool"]) as ioctx:
            names = [item.key for item in ioctx.list_objects() if item.key.startswith(f"chunkvol/{pool_uuid}/")]
            return {name: ioctx.read(name, ioctx.stat(name)[0]) for name in names}
    finally:
        cluster.shutdown()


def leaks(objects, secrets):
    """[(object name, what leaked)] for every secret found in an object's name or bytes."""
    return [(name, secret[:16]) for name, data in objects.items() for secret in secrets
            if secret in data or secret in name.encode()]


def known_blocks_source(tmp_path, name="src", seed=1):
    """A pool whose volume VOLUME_NAME holds known random blocks, plus the history of
    write_history in volumes v and z; returns (path, [secrets to look for])."""
    path = new_source(tmp_path, name)
    cv(path, "volume", "create", VOLUME_NAME, "--size", "8M")
    rng = random.Random(seed)
    blocks = [rng.randbytes(4096) for _ in range(64)]
    with Pool.open(path) as pool:
        volume = pool.volume(VOLUME_NAME)
        for index, block in enumerate(blocks):
            volume.write(block, index * 3 * 4096)
        pool.flush()
    write_history(path, seed, rounds=1)
    secrets = [block[1000:1000 + SAMPLE_BYTES] for block in blocks] + [VOLUME_NAME.encode(), b'"compression"']
    return path, secrets


def chunk_bytes(path):
    chunks = os.path.join(path, "chunks")
    return {name: open(os.path.join(chunks, name), "rb").read() for name in os.listdir(chunks)
            if name.endswith(".cvc")}


def volume_bytes(path, name, size):
    with Pool.open(path, readonly=True) as pool:
        buffer = bytearray(size)
        pool.volume(name).read(buffer, 0)
        return bytes(buffer)


def assert_refused(result, code, *fragments):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chunkvol: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ---- the key file -----------------------------------------------------------------------------

def test_a_key_is_private_written_once_and_shown_by_its_fingerprint(tmp_path):
    path = str(tmp_path / "offsite.key")
    old_umask = os.umask(0)  # the file is 0600 whatever the umask
    try:
        result = chunkvol("key", "generate", path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first_line, master_hex = open(path).read().splitlines()
    assert first_line == "chunkvol-store-key 1" and len(bytes.fromhex(master_hex)) == 32
    fingerprint = chunkvol("key", "fingerprint", path).stdout.split()[0]
    assert fingerprint in result.stdout and "without it" in result.stdout and master_hex not in result.stdout
    assert fingerprint not in master_hex  # derived one way, never a piece of the key
    before = open(path, "rb").read()
    assert_refused(chunkvol("key", "generate", path, check=False), 4, "never overwritten")
    assert open(path, "rb").read() == before
    other, other_fingerprint = generate_key(tmp_path, "other.key")
    assert other_fingerprint != fingerprint
    with open(str(tmp_path / "junk.key"), "w") as junk:
        junk.write("not a key\n")
    assert_refused(chunkvol("key", "fingerprint", str(tmp_path / "junk.key"), check=False), 8, "not a chunkvol key")
    os.chmod(path, 0o644)  # a key others can read is refused, as ssh refuses such a private key
    assert_refused(chunkvol("key", "fingerprint", path, check=False), 8, "can be read by others", "chmod 600")
    os.chmod(path, 0o600)
    assert fingerprint in chunkvol("key", "fingerprint", path).stdout


# ---- mirror, scan, restore --------------------------------------------------------------------

def test_an_encrypted_mirror_holds_only_ciphertext_and_restores_only_with_its_key(store_env, tmp_path):
    lab = store_env
    source, secrets = known_blocks_source(tmp_path)
    key, fingerprint = generate_key(tmp_path)
    wrong_key, _ = generate_key(tmp_path, "wrong.key")
    added = cv(source, "mirror", "add", "r", "--to", rados_url(lab), "--key", key).stdout
    assert fingerprint in added
    cv(source, "mirror", "add", "s", "--to", s3_url(lab), "--key", key)
    for name in ("r", "s"):
        cv(source, "mirror", "sync", name)
    write_history(source, 2, rounds=1, first=False)  # more segments, chained to the first
    for name in ("r", "s"):
        cv(source, "mirror", "sync", name)

    rows = json.loads(cv(source, "mirror", "list", "--json").stdout)
    assert [(row["encrypted"], row["key_fingerprint"]) for row in rows] == [(True, fingerprint)] * 2
    assert all(open(key).read().split()[-1] not in json.dumps(row) for row in rows)
    assert f"encrypted (key {fingerprint})" in cv(source, "mirror", "list").stdout
    status = json.loads(cv(source, "mirror", "status", "s", "--json").stdout)
    assert (status["encrypted"], status["key_fingerprint"], status["bytes_behind"]) == (True, fingerprint, 0)
    assert f"encrypted (key {fingerprint})" in cv(source, "mirror", "status").stdout

    # The secrets are in the local log as plaintext (so the scan below can find them)...
    assert len(leaks(chunk_bytes(source), secrets[:-1])) >= len(secrets) - 3
    # ...and in no object of either store, names or bytes.
    pool_uuid = uuid_of(source)
    for objects in (s3_objects(lab, pool_uuid), rados_objects(lab, pool_uuid)):
        assert len([name for name in objects if name.endswith(".seg")]) >= 2
        assert leaks(objects, secrets) == []
        marker = objects.pop(store_marker.object_name(bytes.fromhex(pool_uuid)))
        assert fingerprint.encode() in marker
        assert all(data[:4] == b"CVsx" for data in objects.values()), sorted(objects)

    expected = everything(source)
    os.rename(source, str(tmp_path / "gone"))  # the machine is lost; only the stores and the key remain
    for url in (rados_url(lab), s3_url(lab)):
        target = str(tmp_path / "restored")
        assert_refused(restore(url, target, pool_uuid, check=False), 8, f"encrypted with the key {fingerprint}",
                       "--key")
        assert not os.path.exists(target) and not os.path.exists(target + ".restoring")
        assert_refused(restore(url, target, pool_uuid, "--key", wrong_key, check=False), 8,
                       f"encrypted with the key {fingerprint}, not with {wrong_key}")
        assert not os.path.exists(target) and not os.path.exists(target + ".restoring")
        assert_refused(restore(url, target, pool_uuid, "--key", str(tmp_path / "absent.key"), check=False), 8,
                       "cannot read the key file")
        report = json.loads(restore(url, target, pool_uuid, "--key", key, "--json").stdout)
        assert VOLUME_NAME in report["volumes"]
        assert (report["encrypted"], report["key_fingerprint"]) == (True, fingerprint)
        restored = everything(target)
        assert [point for point in expected if restored.get(point) != expected[point]] == []
        assert cv(target, "check").returncode == 0
        os.rename(target, str(tmp_path / f"restored-{url[:2]}"))


def test_a_key_that_does_not_fit_the_store_is_refused_at_mirror_add(store_env, tmp_path):
    lab = store_env
    key, fingerprint = generate_key(tmp_path)
    other_key, _ = generate_key(tmp_path, "other.key")
    encrypted = new_source(tmp_path, "encrypted")
    cv(encrypted, "mirror", "add", "s", "--to", s3_url(lab), "--key", key)
    cv(encrypted, "mirror", "sync", "s")
    cv(encrypted, "mirror", "remove", "s")
    assert_refused(cv(encrypted, "mirror", "add", "s", "--to", s3_url(lab), check=False), 8,
                   f"encrypted with the key {fingerprint}")
    assert_refused(cv(encrypted, "mirror", "add", "s", "--to", s3_url(lab), "--key", other_key, check=False), 8,
                   "not with")
    assert json.loads(cv(encrypted, "mirror", "list", "--json").stdout) == []
    cv(encrypted, "mirror", "add", "s", "--to", s3_url(lab), "--key", key)  # its own key: continues

    plain = new_source(tmp_path, "plain")
    cv(plain, "mirror", "add", "r", "--to", rados_url(lab))
    cv(plain, "mirror", "sync", "r")
    cv(plain, "mirror", "remove", "r")
    assert_refused(cv(plain, "mirror", "add", "r", "--to", rados_url(lab), "--key", key, check=False), 8,
                   "unencrypted")
    assert_refused(restore(rados_url(lab), str(tmp_path / "t"), uuid_of(plain), "--key", key, check=False), 8,
                   "unencrypted")
    assert not os.path.exists(str(tmp_path / "t"))
    assert_refused(cv(plain, "mirror", "add", "d", "--to", f"dir:{tmp_path / 'd'}", "--key", key, check=False), 2,
                   "object-store mirrors")

    # A key file replaced behind a mirror's back: the shipper says so, ships nothing.
    os.rename(key, key + ".saved")
    os.rename(other_key, key)
    assert_refused(cv(encrypted, "mirror", "sync", "s", check=False), 8, "not", fingerprint)


# ---- what the store may do wrong ---------------------------------------------------------------

def test_tampered_swapped_cut_or_replayed_objects_are_detected_and_nothing_is_restored(store_env, tmp_path):
    lab = store_env
    key, _ = generate_key(tmp_path)

    def shipped(name, rounds):
        path = str(tmp_path / name)
        cv(path, "init", "--chunk-size", "16M")
        cv(path, "volume", "create", "v", "--size", "16M")
        cv(path, "mirror", "add", "s", "--to", s3_url(lab), "--key", key)
        rng = random.Random(name)
        for _ in range(rounds):
            with Pool.open(path) as pool:
                pool.volume("v").write(rng.randbytes(2 * MiB), rng.randrange(0, 14) * MiB)
                pool.flush()
            cv(path, "mirror", "sync", "s")
        return path

    source, other = shipped("src", 4), shipped("other", 2)  # two pools, one key
    pool_uuid = uuid_of(source)
    names = sorted(name for name in s3_objects(lab, pool_uuid) if name.endswith(".seg"))
    assert len(names) == 4
    store = Tampering(lab, names)
    target = str(tmp_path / "restored")

    def refused(*fragments):
        assert_refused(restore(s3_url(lab), target, pool_uuid, "--key", key, check=False), 6, *fragments)
        assert not os.path.exists(target) and not os.path.exists(target + ".restoring")

    flipped = bytearray(store.originals[names[1]])
    flipped[len(flipped) // 2] ^= 0x10  # in the payload's ciphertext
    store.put(names[1], bytes(flipped))
    refused("fails authentication", names[1])
    store.mended()
    header_flipped = bytearray(store.originals[names[2]])
    header_flipped[70] ^= 1  # in the sealed segment header (read alone, ranged)
    store.put(names[2], bytes(header_flipped))
    refused("fails authentication", names[2])
    store.mended()
    store.put(names[1], store.originals[names[1]][:-100])  # cut short
    refused(names[1])
    store.mended()
    store.put(names[1], store.originals[names[2]])  # swapped bodies
    store.put(names[2], store.originals[names[1]])
    refused("fails authentication")
    store.mended()
    other_segment = sorted(name for name in s3_objects(lab, uuid_of(other)) if name.endswith(".seg"))[0]
    store.put(names[0], store.get(other_segment))  # same key, other pool
    refused("fails authentication")
    store.mended()
    store.delete(names[2])
    refused("is missing")
    store.mended()
    # A stale segment, sealed with the right key under its right name (what one who held the
    # key, or an older upload, could put there): the chain check on the plaintext still names it.
    store_key = load_key(key)
    raw = sealed_object.open_whole(store_key, names[1], store.originals[names[1]])
    header = segment.decode_header(raw, names[1])
    records = [bytes(view) for view in segment.split_records(raw, header, names[1])]
    stale, _ = segment.encode(bytes.fromhex(pool_uuid), header.origin, records, header.previous_sequence,
                              header.previous_digest ^ 1)
    store.put(names[1], sealed_object.seal(store_key, names[1], stale, SealedStore.head_bytes(names[1])))
    refused("does not follow")
    store.mended()
    restore(s3_url(lab), target, pool_uuid, "--key", key)
    assert everything(target) == everything(source)


# ---- tiering and self-heal through the key (restore --until: test_object_mirrors.py) -----------------------------------

def test_evicted_chunks_read_back_through_the_key_and_tampered_pieces_never_do(store_env, tmp_path, monkeypatch):
    lab = store_env
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, ENVIRONMENT[name])  # for the pool opened in this process
    key, fingerprint = generate_key(tmp_path)
    pool = str(tmp_path / "src")
    cv(pool, "init", "--chunk-size", "16M")
    cv(pool, "volume", "create", VOLUME_NAME, "--size", "40M")
    cv(pool, "mirror", "add", "s", "--to", s3_url(lab), "--key", key)
    rng = random.Random(4)
    model = rng.randbytes(36 * MiB) + bytes(4 * MiB)
    with Pool.open(pool) as opened:
        for offset in range(0, 36 * MiB, MiB):
            opened.volume(VOLUME_NAME).write(model[offset:offset + MiB], offset)
        opened.flush()
    cv(pool, "mirror", "sync", "s")
    assert "evicted to" in cv(pool, "chunk", "evict", "--keep-under", "20M", "--mirror", "s").stdout
    rows = json.loads(cv(pool, "chunk", "list", "--json").stdout)
    evicted_ids = [row["id"] for row in rows if row["where"] == "evicted"]
    assert evicted_ids and evicted_ids[0] == 1
    manifest_path = os.path.join(pool, "chunks", f"chunk-{evicted_ids[0]:016x}.cvm")
    manifest = evicted.decode(open(manifest_path, "rb").read())
    assert (manifest.key_path, manifest.key_fingerprint) == (key, fingerprint)

    pieces = {name: data for name, data in s3_objects(lab, uuid_of(pool)).items() if "/chunks/" in name}
    assert pieces and leaks(pieces, [model[offset:offset + SAMPLE_BYTES] for offset in range(5000, 36 * MiB, MiB)]
                            + [VOLUME_NAME.encode()]) == []

    def read_all():
        with Pool.open(pool) as opened:
            buffer = bytearray(40 * MiB)
            opened.volume(VOLUME_NAME).read(buffer, 0)
            return bytes(buffer), opened.chunks.get(evicted_ids[0]).remote.fetches

    data, fetches = read_all()
    assert data == model and fetches > 0
    data, fetches = read_all()  # the second time from the local cache
    assert data == model and fetches == 0

    client = s3_client(lab)
    piece = manifest.piece_name(0)
    original = client.get_object(Bucket=lab["s3_bucket"], Key=piece)["Body"].read()
    tampered = bytearray(original)
    tampered[len(tampered) // 3] ^= 4
    client.put_object(Bucket=lab["s3_bucket"], Key=piece, Body=bytes(tampered))
    os.unlink(manifest_path[:-4] + ".cache")
    result = cv(pool, "check", check=False)
    assert result.returncode == 6 and "fails authentication" in result.stderr + result.stdout, result
    client.put_object(Bucket=lab["s3_bucket"], Key=piece, Body=original)
    assert read_all()[0] == model


def test_scrub_heals_from_an_encrypted_store(store_env, tmp_path):
    lab = store_env
    key, _ = generate_key(tmp_path)
    path = str(tmp_path / "src")
    cv(path, "init", "--chunk-size", "16M")
    cv(path, "volume", "create", "v", "--size", "8M")
    cv(path, "volume", "create", "z", "--size", "8M", "--compression", "zstd")
    cv(path, "mirror", "add", "r", "--to", rados_url(lab), "--key", key)
    rng = random.Random(6)
    for round_number in range(3):
        with Pool.open(path) as pool:
            for name in ("v", "z"):
                half = rng.randbytes(32768)
                pool.volume(name).write(half + bytes(32768), round_number * MiB)
            pool.flush()
        cv(path, "mirror", "sync", "r")
    before = {name: volume_bytes(path, name, 8 * MiB) for name in ("v", "z")}
    damaged = {**_damage(path, 2, "v"), **_damage(path, 2, "z")}
    report, _ = _scrub(path)
    assert _healed_from(report) == {where: "r" for where in damaged} and report["not_healed"] == [], report
    assert {name: volume_bytes(path, name, 8 * MiB) for name in before} == before


@pytest.mark.parametrize("url_of", [rados_url, s3_url], ids=["rados", "s3"])
def test_a_served_pool_ships_to_an_encrypted_mirror_with_read_ahead(store_env, tmp_path, serves, url_of):
    """`serve`'s shipper (read-ahead: the next segment sealed while one is put) keeps an
    encrypted mirror caught up; what it shipped restores."""
    lab = store_env
    key, _ = generate_key(tmp_path)
    pool = str(tmp_path / "src")
    cv(pool, "init", "--chunk-size", "16M")
    cv(pool, "volume", "create", "v", "--size", "32M")
    cv(pool, "mirror", "add", "m", "--to", url_of(lab), "--key", key)
    serve = Serve(pool, str(tmp_path / "nbd.sock"), str(tmp_path / "serve.log")).start()
    serves.append(serve)
    handle = serve.connect()
    rng = random.Random(10)
    for _ in range(24):
        handle.pwrite(rng.randbytes(MiB), rng.randrange(0, 31) * MiB)
        if rng.random() < 0.3:
            handle.flush()
    handle.flush()
    wait_caught_up(pool, "m")
    handle.shutdown()
    serve.stop()
    target = str(tmp_path / "restored")
    restore(url_of(lab), target, uuid_of(pool), "--key", key)
    assert everything(target) == everything(pool)
