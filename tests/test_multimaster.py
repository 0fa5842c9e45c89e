"""Multi-master: two nodes of one pool both write, exchange their flush intervals in any order,
late, twice, across restarts, and converge to what an independent oracle computes from their
logs (tests/multimaster_sim.py), conflicts included."""

import random

import pytest

from chunkvol import history
from tests.multimaster_sim import Oracle, SimulatedTime, contents, pool_pair, random_ops, ship

MiB = 1 << 20


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


@pytest.mark.parametrize("seed", range(12))
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
    finally:
        for node in nodes:
            node.close()
