"""Multi-master: two nodes of one pool both write, exchange their flush intervals in any order,
late, twice, across restarts, and converge to what an independent oracle computes from their
logs (tests/support/multimaster_sim.py), conflicts included."""

import os
import random
import shutil

import pytest

from chunkvol import compaction, history
from chunkvol.mirror import config as mirror_config
from tests.support.multimaster_sim import Oracle, SimulatedTime, contents, pool_pair, random_ops, ship

MiB = 1 << 20
SEEDS = int(os.environ.get("CHUNKVOL_SIM_SEEDS", "24"))  # `make test-soak` runs many more


def _exchange_everything(nodes):
    for _ in range(3):
        for source in nodes:
            for target in nodes:
                if source is not target:
                    ship(source, target)


def _reported_conflicts(node):
    pool = node.pool
    return sorted(tuple(entry) for info in pool.volumes_by_id.values()
                  for entry in pool.blockmap.conflicts(info.volume_id))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_two_writers_converge_to_the_oracle(tmp_path, seed):
    """Seeded: which node writes what, how much of each log reaches the other and when, resends,
    restarts, and the wall clock each node reads (node 1's is 40 ms behind)."""
    rng = random.Random(seed)
    time = SimulatedTime(rng)
    nodes = pool_pair(tmp_path, walls=[time.wall_for(0), time.wall_for(1, -40_000_000)])
    try:
        a, b = nodes
        a.pool.create_volume("mm", 2 * MiB, mode="multi-master")
        a.pool.create_volume("mz", MiB, compression="zstd", mode="multi-master")
        _exchange_everything(nodes)
        assert set(b.pool.volumes) == {"mm", "mz"}
        snapshot_number = 0
        for round_number in range(8):
            for node in nodes:
                random_ops(node, rng.choice(["mm", "mz"]), rng, rng.randrange(3, 25))
                if rng.random() < 0.3:
                    snapshot_number += 1
                    history.create_snapshot(node.pool, "mm", f"s{snapshot_number}")
            for source in nodes:
                target = b if source is a else a
                ship(source, target, batches=rng.randrange(0, 4), duplicate=rng.random() < 0.2)
            if rng.random() < 0.3:  # a restart: the map is rebuilt from checkpoint and log
                victim = rng.choice(nodes)
                victim.close()
                victim.open()
        _exchange_everything(nodes)
        expected = Oracle(nodes).expected()
        for node in nodes:
            found = contents(node)
            assert sorted(found) == sorted(expected)
            wrong = [point for point in expected if found[point] != expected[point]]
            assert not wrong, f"node {node.node_id} differs from the oracle at {wrong}"
        oracle = Oracle(nodes)
        for node in nodes:
            assert _reported_conflicts(node) == oracle.conflicts(node)
        # The same after both restart (checkpointed versions, conflicts and tombstones).
        for node in nodes:
            node.close()
            node.open()
        for node in nodes:
            assert contents(node) == expected
        # Once each has told the other (a heartbeat flush point) that it has seen everything,
        # no tombstone is needed any more: they do not pile up.
        for _ in range(2):
            for node in nodes:
                with node.pool.lock:
                    node.pool.flush_point(durable=node.pool.writer.durable_address, heartbeat=True)
            _exchange_everything(nodes)
        for node in nodes:
            with node.pool.lock:
                node.pool.checkpoint()
            assert node.pool.tombstones.entries() == []
            assert contents(node) == expected
    finally:
        for node in nodes:
            node.close()


@pytest.mark.parametrize("seed", range(3))
def test_clocks_that_jump_back_or_run_ahead_still_converge(tmp_path, seed):
    """Node 1's wall clock jumps back 10 s in the middle, node 0's runs 5 s ahead for a while:
    each node's own writes stay in order (the hybrid clock never goes back) and both converge."""
    rng = random.Random(100 + seed)
    time = SimulatedTime(rng)
    nodes = pool_pair(tmp_path, walls=[time.wall_for(0), time.wall_for(1)])
    try:
        a, b = nodes
        a.pool.create_volume("mm", MiB, mode="multi-master")
        _exchange_everything(nodes)
        for round_number in range(6):
            if round_number == 2:
                time.jump(1, -10_000_000_000)
            if round_number == 3:
                time.jump(0, 5_000_000_000)
            if round_number == 5:
                time.jump(0, -5_000_000_000)
            for node in nodes:
                volume = node.pool.volume("mm")
                offset = rng.randrange(0, 15) * 65536
                first = rng.randbytes(65536)
                volume.write(first, offset)
                volume.write(rng.randbytes(65536), offset)  # the same node's later write must win
                second = bytearray(65536)
                volume.read(second, offset)
                assert bytes(second) != first
                random_ops(node, "mm", rng, 10)
            ship(a, b, batches=rng.randrange(0, 3))
            ship(b, a, batches=rng.randrange(0, 3))
        _exchange_everything(nodes)
        expected = Oracle(nodes).expected()
        for node in nodes:
            assert contents(node) == expected
    finally:
        for node in nodes:
            node.close()


def test_disjoint_writers_have_no_conflicts(tmp_path):
    """Each node writes its own half of a volume (and its own volume): nothing conflicts, and
    everything converges."""
    rng = random.Random(7)
    time = SimulatedTime(rng)
    nodes = pool_pair(tmp_path, walls=[time.wall_for(0), time.wall_for(1)])
    try:
        a, b = nodes
        a.pool.create_volume("mm", 2 * MiB, mode="multi-master")
        b.pool.create_volume("own-b", MiB, mode="multi-master")
        _exchange_everything(nodes)
        for _ in range(5):
            random_ops(a, "mm", rng, 15, region=(0, MiB))
            random_ops(b, "mm", rng, 15, region=(MiB, 2 * MiB))
            random_ops(b, "own-b", rng, 5)
            ship(a, b, batches=rng.randrange(0, 3))
            ship(b, a, batches=rng.randrange(0, 3))
        _exchange_everything(nodes)
        expected = Oracle(nodes).expected()
        for node in nodes:
            assert contents(node) == expected
            assert _reported_conflicts(node) == []
    finally:
        for node in nodes:
            node.close()


def test_three_nodes_converge(tmp_path):
    rng = random.Random(33)
    time = SimulatedTime(rng)
    nodes = pool_pair(tmp_path, count=3, walls=[time.wall_for(index) for index in range(3)])
    try:
        nodes[0].pool.create_volume("mm", MiB, mode="multi-master")
        _exchange_everything(nodes)
        for _ in range(6):
            for node in nodes:
                random_ops(node, "mm", rng, rng.randrange(3, 15))
            for source in nodes:
                for target in nodes:
                    if source is not target:
                        ship(source, target, batches=rng.randrange(0, 3))
        _exchange_everything(nodes)
        expected = Oracle(nodes).expected()
        for node in nodes:
            assert contents(node) == expected
    finally:
        for node in nodes:
            node.close()


def test_same_volume_name_created_on_two_nodes_apart(tmp_path):
    """Created on both while apart: the older keeps the name, the newer is NAME.nodeN, on both."""
    rng = random.Random(3)
    time = SimulatedTime(rng)
    nodes = pool_pair(tmp_path, walls=[time.wall_for(0), time.wall_for(1)])
    try:
        a, b = nodes
        a.pool.create_volume("data", MiB, mode="multi-master")
        b.pool.create_volume("data", 2 * MiB, mode="multi-master")
        a.pool.volume("data").write(b"a" * 4096, 0)
        b.pool.volume("data").write(b"b" * 4096, 0)
        _exchange_everything(nodes)
        for node in nodes:
            assert sorted(node.pool.volumes) == ["data", f"data.node{b.node_id & 15}"]
            assert node.pool.volumes["data"].size_bytes == MiB
        assert contents(a) == contents(b) == Oracle(nodes).expected()
    finally:
        for node in nodes:
            node.close()


def _volume_table(node):
    return sorted((info.name, info.volume_id, info.size_bytes, info.mode) for info in node.pool.volumes.values())


@pytest.mark.parametrize("first", ["a", "b"])
def test_volume_changes_made_apart_converge_whatever_arrives_first(tmp_path, first):
    """Issue 14, item 5. While apart: B removes volume "gone" while A writes to it; A and B
    resize "grown" to different sizes and write past the old end; A resizes "small" smaller
    than B had (never shrinks). Exchanged in either order: no batch is refused (before: "no
    such volume" and "never shrinks" stalled replication from that node for good), both end
    with one volume table (a remove wins; the greatest size wins) and the same contents."""
    rng = random.Random(7)
    time = SimulatedTime(rng)
    nodes = pool_pair(tmp_path, walls=[time.wall_for(0), time.wall_for(1)])
    try:
        a, b = nodes
        for name in ("gone", "grown", "small"):
            a.pool.create_volume(name, 4 * MiB, mode="multi-master")
        _exchange_everything(nodes)
        b.pool.remove_volume("gone")
        a.pool.volume("gone").write(b"a" * 8192, 0)
        a.pool.resize_volume("grown", 8 * MiB)
        b.pool.resize_volume("grown", 6 * MiB)
        a.pool.volume("grown").write(b"A" * 4096, 7 * MiB)
        b.pool.volume("grown").write(b"B" * 4096, 5 * MiB)
        b.pool.resize_volume("small", 12 * MiB)
        a.pool.resize_volume("small", 5 * MiB)
        for node in nodes:
            node.pool.flush()
        order = nodes if first == "a" else nodes[::-1]
        ship(order[0], order[1])
        ship(order[1], order[0])
        _exchange_everything(nodes)
        assert _volume_table(a) == _volume_table(b)
        assert sorted(a.pool.volumes) == ["grown", "small"]
        assert a.pool.volumes["grown"].size_bytes == 8 * MiB
        assert a.pool.volumes["small"].size_bytes == 12 * MiB
        assert contents(a) == contents(b)
        grown = contents(a)["grown"]
        assert grown[7 * MiB:7 * MiB + 4096] == b"A" * 4096 and grown[5 * MiB:5 * MiB + 4096] == b"B" * 4096
        # Replication goes on after them.
        a.pool.volume("grown").write(b"later" * 800 + bytes(96), 0)
        _exchange_everything(nodes)
        assert contents(a) == contents(b)
    finally:
        for node in nodes:
            node.close()


@pytest.mark.parametrize("rebuild", [False, True])
def test_a_removed_volume_is_remembered_across_restarts(tmp_path, rebuild):
    """B removed a volume; A's writes to it, made before A heard of that, reach B only after B
    restarted (from its checkpoint, or rebuilding its map from the log): they are taken and
    dropped, not refused (the removed ids live in the checkpoint and replay from the log)."""
    time = SimulatedTime(random.Random(8))
    nodes = pool_pair(tmp_path, walls=[time.wall_for(0), time.wall_for(1)])
    try:
        a, b = nodes
        a.pool.create_volume("gone", 4 * MiB, mode="multi-master")
        a.pool.create_volume("kept", 4 * MiB, mode="multi-master")
        _exchange_everything(nodes)
        b.pool.remove_volume("gone")
        a.pool.volume("gone").write(b"a" * 4096, 0)
        a.pool.volume("kept").write(b"k" * 4096, 0)
        a.pool.flush()
        b.close()
        if rebuild:
            shutil.rmtree(os.path.join(b.path, "index"))
        b.open()
        ship(a, b)
        ship(b, a)
        _exchange_everything(nodes)
        assert sorted(a.pool.volumes) == sorted(b.pool.volumes) == ["kept"]
        assert contents(a) == contents(b)
    finally:
        for node in nodes:
            node.close()


@pytest.mark.parametrize("seed", range(SEEDS // 2))
def test_power_loss_on_either_node_loses_no_flushed_write(tmp_path, seed):
    """Storage faults: a node loses power (tests/support/faults.py: unsynced writes dropped, kept, torn
    or reordered, the block map from any committed checkpoint or rebuilt) at a seeded moment,
    comes back from what its disk held, and the pair still converges to the oracle; every
    write a node had flushed in the region only it writes is there."""
    from tests.support.faults import FaultyFiles, track_index
    rng = random.Random(1000 + seed)
    time = SimulatedTime(rng)
    nodes = pool_pair(tmp_path, walls=[time.wall_for(0), time.wall_for(1)])
    a, b = nodes
    models = {a.node_id: {}, b.node_id: {}}
    regions = {a.node_id: 0, b.node_id: 512 * 1024}
    losses = 0
    try:
        a.pool.create_volume("mm", 2 * MiB, mode="multi-master")
        _exchange_everything(nodes)
        for round_number in range(8):
            victim = rng.choice(nodes) if rng.random() < 0.5 else None
            faulty = None
            if victim is not None:
                victim.close()
                faulty = FaultyFiles(victim.path, seed=seed * 100 + round_number)
                victim.open(files=faulty)
            with track_index(faulty) if faulty else _no_tracking():
                for node in nodes:
                    volume = node.pool.volume("mm")
                    pending = {}
                    for _ in range(rng.randrange(2, 8)):
                        offset = regions[node.node_id] + rng.randrange(0, 7) * 65536
                        data = rng.randbytes(65536)
                        volume.write(data, offset)
                        pending[offset] = data
                    node.pool.flush()
                    models[node.node_id].update(pending)  # flushed: must survive
                    random_ops(node, "mm", rng, rng.randrange(2, 8), region=(MiB, 2 * MiB))
                    volume.write(rng.randbytes(4096), regions[node.node_id] + 7 * 65536)  # not flushed: may go
                lose_first = rng.random() < 0.7  # before shipping, which flushes: unsynced bytes at stake
                if not lose_first or victim is None:
                    for source in nodes:
                        ship(source, b if source is a else a, batches=rng.randrange(0, 3))
                if victim is not None:
                    losses += 1
                    lost = str(tmp_path / f"lost-{round_number}")
                    faulty.power_loss(lost)
                    victim.pool.files = faulty  # the old process is gone: drop it without a clean close
                    faulty.dead = True
                    try:
                        victim.close()
                    except BaseException:  # noqa: BLE001 (whatever the dead process would have done)
                        victim.pool = None
                    victim.path = lost
                    victim.open()
        _exchange_everything(nodes)
        expected = Oracle(nodes).expected()
        for node in nodes:
            found = contents(node)
            assert found == expected
            for offset, data in models[node.node_id].items():
                assert found["mm"][offset:offset + len(data)] == data, (node.node_id, offset)
        assert losses >= 1
    finally:
        for node in nodes:
            try:
                node.close()
            except BaseException:  # noqa: BLE001
                pass


class _no_tracking:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_a_pool_rebuilt_from_its_compaction_base_still_converges(tmp_path):
    """Compaction writes the block map into the log as a base, and a pool whose index is lost
    is rebuilt from it. The base must carry what last-writer-wins needs besides the map: the
    tombstones (without them, a late record of the other node that is older than a hole here
    would win over the hole on this node alone), the other nodes' stamps and the conflicts."""
    clock = SimulatedTime(random.Random(5))
    nodes = pool_pair(tmp_path, walls=[clock.wall_for(0), clock.wall_for(1)])
    a, b = nodes
    try:
        a.pool.create_volume("mm", 32 * MiB, mode="multi-master")
        _exchange_everything(nodes)
        # A conflict: both write block 1 before either has seen the other's write.
        a.pool.volume("mm").write(b"a" * 4096, 4096)
        b.pool.volume("mm").write(b"b" * 4096, 4096)
        _exchange_everything(nodes)
        # B writes blocks 8..15 and keeps them; A zeroes them a second later (concurrent: A
        # has not seen B's write, so only the stamps order them): the newer hole must win.
        b.pool.volume("mm").write(random.Random(6).randbytes(32768), 32768)
        b.pool.flush()
        clock.jump(0, 1_000_000_000)
        a.pool.volume("mm").zero(32768, 32768)
        a.pool.flush()
        # Enough overwritten on A, and its history pruned, that its first chunk is dead;
        # shipped, so that no peer holds it.
        for _ in range(2):
            for offset in range(MiB, 17 * MiB, MiB):
                a.pool.volume("mm").write(random.Random(offset).randbytes(MiB), offset)
            a.pool.flush()
        history.prune(a.pool, "mm", 0, now=clock.now_ns / 1e9 + 60)
        ship(a, b)
        state = mirror_config.load_state(a.path, f"n{b.node_id}", 0)
        state["cursor"] = a.cursors[b.node_id]
        mirror_config.save_state(a.path, f"n{b.node_id}", state)
        assert compaction.compact(a.pool, min_dead=0.5)["victims"], "no chunk was compacted"
        before = (_reported_conflicts(a), sorted(a.pool.tombstones.entries()), a.pool.origin_stamps)
        assert before[0] and before[1], "the set-up should leave a conflict and a tombstone"

        a.close()
        shutil.rmtree(os.path.join(a.path, "index"))
        a.open()
        assert (_reported_conflicts(a), sorted(a.pool.tombstones.entries()), a.pool.origin_stamps) == before
        _exchange_everything(nodes)  # B's older write of blocks 8..15 reaches A only now
        assert contents(a) == contents(b)
        assert contents(a)["mm"][32768:65536] == bytes(32768)
    finally:
        for node in nodes:
            node.close()
