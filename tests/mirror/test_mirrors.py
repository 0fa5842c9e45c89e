"""Asynchronous mirrors to a pool on another disk (`mirror add NAME --to dir:PATH`), as a user
runs them: the chunkvol command, real nbdkit servers and clients, kill -9.

The mirror must become byte-identical to its source in every volume, every snapshot and
every point of history; resume after any interruption without applying anything twice;
refuse what a node of the pool would never send; hold the chunks it still needs against
compaction; and become a writable pool when promoted.
"""

import json
import os
import random
import signal
import socket
import subprocess
import time

import nbd
import pytest

from chunkvol.clock import COUNTER_BITS
from chunkvol.errors import PeerError
from chunkvol.format import record
from chunkvol.format.record import HEADER_SIZE, RecordType
from chunkvol.mirror import node_link, receiver
from chunkvol.pool import VOLUME_ID_NODE_SHIFT, Pool
from tests.support.faults import FaultyFiles, PowerLoss
from tests.support.mirrors import (Serve, assert_identical, cv, everything, log_batch, new_source, status,
                                   wait_caught_up, write_history)
from tests.support.server import CHUNKVOL, ENVIRONMENT

MiB = 1 << 20


# ---- a mirror on another disk, synced by hand --------------------------------------------

def test_dir_mirror_is_identical_in_every_point_and_serves_read_only(tmp_path, server_factory):
    source = new_source(tmp_path)
    write_history(source, 1)
    mirror = str(tmp_path / "mirror")
    result = cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}")
    assert "a running `serve` ships to it now" in result.stdout
    before = status(source, "m")
    assert before["bytes_behind"] > 0 and before["records_behind"] > 0 and before["seconds_behind"] > 0
    assert cv(source, "mirror", "list", "--json").stdout.count('"dir:') == 1
    cv(source, "mirror", "sync", "m")
    after = status(source, "m")
    assert (after["bytes_behind"], after["records_behind"], after["seconds_behind"]) == (0, 0, 0.0), after
    assert after["state"] == "idle" and after["shipped_records"] > 100 and after["last_error"] is None
    assert assert_identical(source, mirror) > 10

    # The mirror is a whole pool: served read-only, every volume and snapshot is there.
    server = server_factory(mirror, "readonly=true")
    exports = [name for name, _ in _list_exports(server)]
    assert {"v", "z", "c", "v@s1", "v@s2"} <= set(exports)
    handle = server.connect("v@s2")
    assert handle.is_read_only()
    with Pool.open(source, readonly=True) as pool:
        volume = pool.volume("v@s2")
        expected = bytearray(MiB)
        volume.read(expected, 5 * MiB)
    assert handle.pread(MiB, 5 * MiB) == bytes(expected)
    handle.shutdown()

    # A mirror changes only through its source.
    refused = cv(mirror, "volume", "create", "x", "--size", "1M", check=False)
    assert refused.returncode == 1 and "is a mirror of node" in refused.stderr
    assert json.loads(cv(mirror, "status", "--json").stdout)["role"] == "mirror"

    # More writes at the source, synced again: only the new records travel.
    shipped = after["shipped_bytes"]
    write_history(source, 2, rounds=1, first=False)
    cv(source, "mirror", "sync", "m")
    assert shipped < status(source, "m")["shipped_bytes"] < 2 * shipped
    assert_identical(source, mirror)


def _list_exports(server):
    handle = nbd.NBD()
    handle.set_opt_mode(True)
    handle.connect_unix(server.socket_path)
    found = []
    handle.opt_list(lambda name, description: found.append((name, description)) or 0)
    handle.opt_abort()
    return found


def test_dir_mirrors_take_node_indexes_no_node_of_the_pool_has_had(tmp_path):
    """Issue 14, item 6: a dir: mirror (a writer once promoted) takes an index that neither the
    source, nor a node it issued a join file for, nor an earlier mirror has; when all 16 are
    taken, `mirror add` is refused with a clear error; join files count the same."""
    from chunkvol.clock import MAX_NODES, node_index
    source = new_source(tmp_path)
    for number in range(MAX_NODES - 3):  # 13 joined nodes: with the source, 14 indexes taken
        cv(source, "join-file", str(tmp_path / f"n{number}.join"))
    indexes = {node_index(Pool.read_metadata(source)["node_id"])}
    indexes |= {node_index(json.load(open(tmp_path / f"n{number}.join"))["node_id"])
                for number in range(MAX_NODES - 3)}
    assert len(indexes) == MAX_NODES - 2
    for name in ("m1", "m2"):
        cv(source, "mirror", "add", name, "--to", f"dir:{tmp_path / name}")
        cv(source, "mirror", "sync", name)
        index = node_index(Pool.read_metadata(str(tmp_path / name))["node_id"])
        assert index not in indexes, (name, index, indexes)
        indexes.add(index)
    refused = cv(source, "mirror", "add", "m3", "--to", f"dir:{tmp_path / 'm3'}", check=False)
    assert refused.returncode == 2 and "node indexes are all taken" in refused.stderr, refused.stderr
    assert not os.path.exists(tmp_path / "m3" / "pool.json") and "m3" not in cv(source, "mirror", "list").stdout
    refused = cv(source, "join-file", str(tmp_path / "one-more.join"), check=False)
    assert refused.returncode == 2 and "the most it can have" in refused.stderr, refused.stderr


def test_a_mirror_with_its_sources_index_is_not_promoted(tmp_path):
    """A mirror made before indexes were enforced, with its source's index: promoted, its
    stamps and the source's could be equal, so `mirror promote` refuses it (item 6)."""
    source = new_source(tmp_path)
    write_history(source, 4, rounds=1)
    fields = Pool.read_metadata(source)
    mirror = str(tmp_path / "mirror")
    Pool.create(mirror, chunk_size=fields["chunk_size"], node_id=fields["node_id"] ^ (1 << 8),
                pool_uuid=bytes.fromhex(fields["pool_uuid"]), mirror_of=fields["node_id"])
    cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}")
    cv(source, "mirror", "sync", "m")
    refused = cv(mirror, "mirror", "promote", check=False)
    assert refused.returncode == 2 and "would carry the same stamps" in refused.stderr, refused.stderr
    assert Pool.read_metadata(mirror)["role"] == "mirror"


def test_promote_makes_a_mirror_writable(tmp_path):
    source = new_source(tmp_path)
    write_history(source, 3, rounds=1)
    mirror = str(tmp_path / "mirror")
    cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}")
    cv(source, "mirror", "sync", "m")
    assert "not a mirror" in cv(source, "mirror", "promote", check=False).stderr
    result = cv(mirror, "mirror", "promote")
    assert "is now a writable pool" in result.stdout
    cv(mirror, "volume", "create", "after", "--size", "1M")
    cv(mirror, "snapshot", "create", "v@promoted")
    assert "after" in cv(mirror, "volume", "list").stdout
    status_after = json.loads(cv(mirror, "status", "--json").stdout)
    assert status_after["role"] == "primary" and status_after["damage"] == []
    # What it held as a mirror is all still there.
    before = everything(source)
    theirs = everything(mirror)
    assert all(theirs[point] == before[point] for point in before)


def test_bad_mirror_commands(tmp_path):
    source = new_source(tmp_path)
    mirror = str(tmp_path / "mirror")
    assert cv(source, "mirror", "add", "m", "--to", "ftp:somewhere", check=False).returncode == 2
    assert cv(source, "mirror", "add", "bad/name", "--to", f"dir:{mirror}", check=False).returncode == 2
    assert cv(source, "mirror", "add", "m", "--to", f"dir:{source}", check=False).returncode == 2
    assert cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}", "--bandwidth", "12Q",
              check=False).returncode == 2
    cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}")
    assert cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}2", check=False).returncode == 4
    assert cv(source, "mirror", "add", "m2", "--to", f"dir:{mirror}", check=False).returncode == 4
    assert cv(source, "mirror", "sync", "nope", check=False).returncode == 3
    assert cv(source, "mirror", "remove", "nope", check=False).returncode == 3
    other = new_source(tmp_path, "other")
    wrong = cv(other, "mirror", "add", "m", "--to", f"dir:{mirror}", check=False)
    assert wrong.returncode == 1 and "another pool" in wrong.stderr
    cv(source, "mirror", "remove", "m")
    assert cv(source, "mirror", "list").stdout.strip() == "no mirrors"
    assert os.path.exists(os.path.join(mirror, "pool.json")), "remove leaves the mirror's data alone"


def test_bandwidth_limit_is_kept(tmp_path):
    """--bandwidth 1M: a sync of ~3 MiB of records takes at least ~2 s (a lower bound the
    limiter guarantees; no upper bound is asserted)."""
    source = new_source(tmp_path)
    with Pool.open(source) as pool:
        volume = pool.volume("v")
        for index in range(6):
            volume.write(os.urandom(512 << 10), index * MiB)
            pool.flush()
    mirror = str(tmp_path / "mirror")
    cv(source, "mirror", "add", "slow", "--to", f"dir:{mirror}", "--bandwidth", "1M")
    started = time.monotonic()
    cv(source, "mirror", "sync", "slow")
    shipped = status(source, "slow")["shipped_bytes"]
    assert shipped > 3 * MiB
    assert time.monotonic() - started >= (shipped - MiB) / MiB * 0.9
    assert_identical(source, mirror)


def test_compaction_keeps_what_a_mirror_still_needs(tmp_path):
    source = new_source(tmp_path)
    with Pool.open(source) as pool:
        volume = pool.volume("v")
        for _ in range(6):  # rewrite the same 8 MiB: the old chunks become dead
            for index in range(8):
                volume.write(os.urandom(MiB), index * MiB)
            pool.flush()
    mirror = str(tmp_path / "mirror")
    cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}")
    cv(source, "prune", "--keep", "0s")
    held = json.loads(cv(source, "compact", "--json").stdout)
    assert held["victims"] == [] and held["held_for_mirrors_from_chunk"] == 1
    cv(source, "mirror", "sync", "m")
    freed = json.loads(cv(source, "compact", "--json").stdout)
    assert freed["victims"], freed
    write_history(source, 4, rounds=1, first=False)
    cv(source, "mirror", "sync", "m")
    assert_identical(source, mirror)


# ---- the receiving side refuses what a node would never send ------------------------------

def _header(raw):
    return record.decode_header(memoryview(raw)[:HEADER_SIZE])


def _forged(raw, **changes):
    """The record with header fields changed and both checksums made right again."""
    header = list(record.decode_header(memoryview(raw)[:HEADER_SIZE]))
    names = ["record_type", "flags", "volume_id", "stored_length", "origin_node", "origin_sequence", "hlc",
             "offset_bytes", "length_bytes"]
    for name, value in changes.items():
        header[names.index(name)] = value
    payload = bytes(raw[HEADER_SIZE:])
    out = bytearray(HEADER_SIZE + len(payload))
    record.encode_header_into(out, 0, header[0], header[1], header[2], payload, header[4], header[5], header[6],
                              header[7], header[8])
    out[HEADER_SIZE:] = payload
    if header[0] == RecordType.EXTENT and not header[1] & record.FLAG_ZSTD:
        count = header[8] // 4096
        table = payload[:count * 8]
        record.encode_header_into(out, 0, header[0], header[1], header[2], payload[count * 8:], header[4],
                                  header[5], header[6], header[7], header[8], table=table)
    return bytes(out)


def test_receiver_refuses_hostile_batches_and_changes_nothing(tmp_path):
    source = new_source(tmp_path)
    write_history(source, 5, rounds=1)
    fields, records = log_batch(source)
    origin = fields["node_id"]
    mirror = str(tmp_path / "mirror")
    Pool.create(mirror, chunk_size=16 << 20, pool_uuid=bytes.fromhex(fields["pool_uuid"]), mirror_of=origin)
    uuid = bytes.fromhex(fields["pool_uuid"])
    extent = next(index for index, raw in enumerate(records) if raw[5] == RecordType.EXTENT)
    create = next(index for index, raw in enumerate(records) if raw[5] == RecordType.VOLUME_CREATE)

    def replaced(index, raw):
        return records[:index] + [raw] + records[index + 1:]

    flipped = bytearray(records[extent])
    flipped[-1] ^= 0x40
    bad_json = bytearray(records[create])
    bad_json[HEADER_SIZE:] = b"{" + bytes(len(bad_json) - HEADER_SIZE - 1)
    hostile = {
        "another pool": (os.urandom(16), origin, records),
        "this node's own name": (uuid, None, records),
        "flipped payload bit": (uuid, origin, replaced(extent, bytes(flipped))),
        "cut short": (uuid, origin, replaced(extent, records[extent][:-100])),
        "garbage": (uuid, origin, replaced(extent, os.urandom(len(records[extent])))),
        "forged origin": (uuid, origin, replaced(extent, _forged(records[extent], origin_node=origin + 1))),
        "replayed sequence": (uuid, origin, replaced(extent + 1, _forged(records[extent + 1], origin_sequence=1))),
        "relocated flag": (uuid, origin, replaced(extent, _forged(records[extent], flags=record.FLAG_RELOCATED))),
        "seal record": (uuid, origin, replaced(extent, _forged(records[extent], record_type=RecordType.SEAL))),
        "unknown volume": (uuid, origin, replaced(extent, _forged(records[extent], volume_id=999))),
        "out of range": (uuid, origin, replaced(extent, _forged(records[extent], offset_bytes=1 << 40))),
        "not at a flush point": (uuid, origin, records[:-1]),
        "volume record not JSON": (uuid, origin, replaced(create, _forged(bytes(bad_json)))),
        "empty": (uuid, origin, []),
        # A stamp's low bits and a new volume id's top bits name the node that made them.
        "stamp of another node's index": (uuid, origin, replaced(extent, _forged(
            records[extent], hlc=_header(records[extent])[6] ^ 1))),
        "volume id of another node's range": (uuid, origin, [_forged(
            records[create], volume_id=_header(records[create])[2] ^ (1 << VOLUME_ID_NODE_SHIFT)), records[-1]]),
        "stamp far ahead of this clock": (uuid, origin, replaced(extent, _forged(
            records[extent], hlc=_header(records[extent])[6] + (3600 * 1000 << COUNTER_BITS)))),
    }
    with Pool.open(mirror) as pool:
        end, held = pool.writer.position, dict(pool.origins)
        for what, (pool_uuid, node, batch) in hostile.items():
            with pytest.raises(PeerError):
                receiver.receive(pool, pool_uuid, pool.node_id if node is None else node, batch)
            assert (pool.writer.position, pool.origins, sorted(pool.volumes)) == (end, held, []), what
        have = receiver.receive(pool, uuid, origin, records)
        assert have == receiver.have(pool, origin)
        assert have == record.decode_header(memoryview(records[-1])[:HEADER_SIZE])[5]
        position = pool.writer.position
        assert receiver.receive(pool, uuid, origin, records) == have  # sent again: nothing twice
        assert pool.writer.position == position
    assert_identical(source, mirror)


def test_a_batch_cut_by_a_crash_is_applied_whole_or_not_at_all(tmp_path):
    """Power lost at every file step of a receive: the reopened mirror holds the batch up to
    one of its flush points (COMMITs) or none of it, never a part of a flush interval (its
    origin sequence says which), and a resend completes it."""
    source = new_source(tmp_path)
    write_history(source, 6, rounds=1)
    fields, records = log_batch(source)
    origin, uuid = fields["node_id"], bytes.fromhex(fields["pool_uuid"])
    template = str(tmp_path / "template")
    Pool.create(template, chunk_size=16 << 20, pool_uuid=uuid, mirror_of=origin)
    Pool.open(template).close()
    headers = [record.decode_header(memoryview(raw)[:HEADER_SIZE]) for raw in records]
    flush_points = {0} | {header[5] for header in headers if header[0] == RecordType.COMMIT}
    last = headers[-1][5]
    outcomes = set()
    for step in range(1, 400, 7):
        work, lost = str(tmp_path / f"w{step}"), str(tmp_path / f"w{step}-lost")
        subprocess.run(["cp", "-a", template, work], check=True)
        faulty = FaultyFiles(work, seed=step, crash_at=step, crash_dir=lost)
        pool = Pool.open(work, files=faulty)
        try:
            receiver.receive(pool, uuid, origin, records)
            faulty.power_loss(lost)
            finished = True
        except PowerLoss:
            finished = False
        pool.writer.used = 0
        pool._release()
        with Pool.open(lost) as reopened:
            have = receiver.have(reopened, origin)
            assert have in flush_points, f"step {step}: part of a flush interval applied ({have})"
            assert reopened.damage == []
            outcomes.add(have)
            receiver.receive(reopened, uuid, origin, records)
        assert_identical(source, lost)
        subprocess.run(["rm", "-rf", work, lost], check=True)
        if finished:
            break
    assert last in outcomes and len(outcomes) >= 3, outcomes  # crashes inside the batch, and none


# ---- served: the shipper runs beside the server ------------------------------------------

def _served(source, tmp_path, serves):
    """`serve` on SOURCE, stopped by the `serves` fixture."""
    serve = Serve(source, str(tmp_path / "nbd.sock"), str(tmp_path / "serve.log")).start()
    serves.append(serve)
    return serve


def _pids_of(pattern):
    found = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def test_serve_ships_while_clients_write_and_resumes_after_kill9(tmp_path, serves):
    source = new_source(tmp_path)
    mirror = str(tmp_path / "mirror")
    serve = _served(source, tmp_path, serves)
    cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}")  # beside the running server
    rng = random.Random(7)
    for cycle in range(3):
        handle = serve.connect()
        for _ in range(60):
            size = rng.choice([4096, 65536, MiB])
            handle.pwrite(rng.randbytes(size), rng.randrange(0, 47) * MiB)
            if rng.random() < 0.2:
                handle.flush()
        handle.flush()
        if cycle == 0:
            # The shipper alone dies: serve starts another, which resumes from the cursor.
            for pid in _pids_of(f"--pool {source} mirror run"):
                os.kill(pid, signal.SIGKILL)
            handle.pwrite(rng.randbytes(MiB), 0)
            handle.flush()
        row = wait_caught_up(source, "m")
        assert row["last_error"] is None
        snapshot = f"v@cycle{cycle}"
        cv(source, "snapshot", "create", snapshot)
        handle.pwrite(rng.randbytes(MiB), 3 * MiB)  # flushed by the horizon's flush point, or lost with the kill
        serve.kill()  # kill -9 of the whole machine's processes, shipper included
        serve.start()
    wait_caught_up(source, "m")
    serve.stop()
    assert not _pids_of(f"--pool {source} mirror run"), "the shipper outlived serve"
    shipped_once = status(source, "m")["shipped_records"]
    with Pool.open(mirror, readonly=True) as pool:
        assert pool.origins[Pool.read_metadata(source)["node_id"]] > 0
    assert_identical(source, mirror)
    assert shipped_once > 100


def test_mirror_sync_beside_serve_waits_for_the_servers_shipper(tmp_path, serves):
    """`mirror sync NAME` while `serve` runs (issue 14, item 9): the server's shipper holds the
    mirror, so sync asks the server how far the log is durable and waits until that mirror
    has all of it, with the same output and exit codes as when nothing is served (it exited 5,
    "in use by another process", for a dir: mirror). A mirror that fails meanwhile fails it."""
    source = new_source(tmp_path)
    mirror = str(tmp_path / "mirror")
    cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}")
    serve = _served(source, tmp_path, serves)
    rng = random.Random(9)
    handle = serve.connect()
    for round_number in range(3):
        for _ in range(20):
            handle.pwrite(rng.randbytes(MiB), rng.randrange(0, 47) * MiB)
        handle.flush()
        synced = cv(source, "mirror", "sync", "m", check=False)
        assert synced.returncode == 0, synced.stderr
        assert "has everything written up to now" in synced.stdout
        row = status(source, "m")
        assert row["bytes_behind"] == 0 and row["last_error"] is None, row
    handle.shutdown()
    # A mirror that cannot be reached: the sync fails with the shipper's error, exit 1 as unserved.
    cv(source, "mirror", "add", "gone", "--to", "node:127.0.0.1:9")
    failed = cv(source, "mirror", "sync", "gone", check=False)
    assert failed.returncode == 1 and "127.0.0.1" in failed.stderr, (failed.returncode, failed.stderr)
    cv(source, "mirror", "remove", "gone")
    serve.stop()
    assert_identical(source, mirror)


def test_mirror_sync_beside_a_bare_nbdkit_ships_itself(tmp_path, server_factory):
    """nbdkit run by hand (no `serve`, so no shipper beside it): `mirror sync` ships itself, as
    it always did, learning the horizon from the server; it does not wait for a shipper that
    is not there."""
    source = new_source(tmp_path)
    mirror = str(tmp_path / "mirror")
    cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}")
    server = server_factory(source)
    handle = server.connect("v")
    handle.pwrite(random.Random(4).randbytes(4 * MiB), 0)
    handle.flush()
    synced = subprocess.run([CHUNKVOL, "--pool", source, "mirror", "sync", "m"], capture_output=True, text=True,
                            env=ENVIRONMENT, timeout=120)
    assert synced.returncode == 0 and "has everything written up to now" in synced.stdout, synced.stderr
    assert status(source, "m")["bytes_behind"] == 0
    handle.shutdown()
    server.stop()
    assert_identical(source, mirror)


def test_a_lost_source_rejoins_the_promoted_mirror_without_a_full_copy(tmp_path):
    """A mirrors to B; A writes more that never reaches B and goes away; B is promoted and
    written; A comes back, rejoins as B's mirror (what it wrote alone is saved aside and cut),
    B mirrors to A, and A ends identical to B, having received only B's new records."""
    a = new_source(tmp_path, "a")
    write_history(a, 31, rounds=1)
    b = str(tmp_path / "b")
    cv(a, "mirror", "add", "b", "--to", f"dir:{b}")
    cv(a, "mirror", "sync", "b")
    shared = everything(a)
    write_history(a, 32, rounds=1, first=False)  # never shipped: A is "lost" now
    cv(b, "mirror", "promote")
    write_history(b, 33, rounds=1, first=False)
    assert "is still a mirror" not in cv(a, "mirror", "rejoin", "--from", f"dir:{b}").stderr
    saved = [name for name in os.listdir(a) if name.startswith("divergent-")]
    assert len(saved) == 1 and os.path.getsize(os.path.join(a, saved[0])) > 0
    assert json.loads(cv(a, "status", "--json").stdout)["role"] == "mirror"
    mine = everything(a)
    assert all(mine[point] == shared[point] for point in shared), "the shared part changed"
    cv(b, "mirror", "add", "a", "--to", f"dir:{a}")
    cv(b, "mirror", "sync", "a")
    shipped = status(b, "a")["shipped_bytes"]
    with Pool.open(a, readonly=True) as pool:
        received = sum(os.path.getsize(pool.chunks.get(c).path) for c in pool.chunks.ids())
    assert shipped < received, "A received more than B's own records: a full copy"
    assert_identical(b, a)
    again = cv(a, "mirror", "rejoin", "--from", f"dir:{b}", check=False)
    assert again.returncode == 2 and "already a mirror" in again.stderr


def test_a_stuck_mirror_does_not_hold_up_the_others(tmp_path, serves):
    """A node: mirror whose listener takes connections and never answers (a peer hung in the
    TLS handshake) makes every try wait out the handshake timeout; meanwhile a dir: mirror of
    the same pool must go on shipping: each flush reaches it within a fraction of one such
    wait (`mirror run` ships each mirror in a thread of its own)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel completes connections; nothing here ever reads them
    try:
        source = new_source(tmp_path)
        mirror = str(tmp_path / "mirror")
        cv(source, "mirror", "add", "stuck", "--to", f"node:127.0.0.1:{listener.getsockname()[1]}")
        cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}")
        serve = _served(source, tmp_path, serves)
        rng = random.Random(5)
        handle = serve.connect()
        for _ in range(4):
            handle.pwrite(rng.randbytes(MiB), rng.randrange(0, 47) * MiB)
            handle.flush()
            wait_caught_up(source, "m", timeout=node_link.HANDSHAKE_SECONDS * 0.6)
        handle.shutdown()
        deadline = time.monotonic() + 3 * node_link.HANDSHAKE_SECONDS
        while (stuck := status(source, "stuck"))["state"] != "error" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "timed out" in (stuck["last_error"] or ""), stuck
        serve.stop()
        assert_identical(source, mirror)
    finally:
        listener.close()
