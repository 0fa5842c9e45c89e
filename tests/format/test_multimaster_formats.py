"""The multi-master structures against hostile bytes: tombstones and conflicts in LMDB, the
seen stamps in a COMMIT, and the unique, per-node stamps of the clock."""

import pytest
from hypothesis import given, settings, strategies as st

from chunkvol.clock import HybridClock, new_node_id, node_index, node_index_of
from chunkvol.errors import CorruptionError
from chunkvol.format import conflict, record, tombstones


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_tombstones_are_refused(data):
    with pytest.raises(CorruptionError):
        tombstones.decode(data)


def test_tombstones_and_conflicts_round_trip_and_detect_damage():
    entries = [(1, 0, 16, 77, 80, 5), (2, 3, 9, 78, 0, 6)]
    raw = tombstones.encode(entries)
    assert tombstones.decode(raw) == entries
    for position in range(len(raw)):
        damaged = bytearray(raw)
        damaged[position] ^= 1
        with pytest.raises(CorruptionError):
            tombstones.decode(bytes(damaged))
    key, value = conflict.encode(3, 16, 32, 1000, 2000)
    assert conflict.decode(key, value) == (3, 16, 32, 1000, 2000)
    with pytest.raises(CorruptionError):
        conflict.decode(key[:-1] + b"\x01", value)
    with pytest.raises(CorruptionError):
        conflict.decode(key, value[:8] + bytes(16))


def test_commit_payload_with_seen_stamps():
    payload = record.encode_commit(4096, {7: 100, 3: 50})
    assert record.commit_seen(payload) == {3: 50, 7: 100}
    assert record.commit_seen(record.encode_commit(4096, {})) == {}
    assert record.commit_payload_valid(len(payload)) and record.commit_payload_valid(8)
    for bad in (0, 7, 9, 8 + 15, 8 + 16 * 17):
        assert not record.commit_payload_valid(bad)


def test_stamps_are_unique_per_node_and_never_go_back():
    now = [1_000_000_000_000]
    clocks = [HybridClock(wall=lambda: now[0], index=index) for index in (0, 5)]
    seen = set()
    for step in range(2000):
        if step == 1000:
            now[0] -= 10_000_000_000  # the wall clock jumps back 10 s
        for index, clock in zip((0, 5), clocks):
            before = clock.last
            stamp = clock.now()
            assert stamp > before and node_index_of(stamp) == index and stamp not in seen
            seen.add(stamp)
    ids = {new_node_id([16, 17, 18]) for _ in range(50)}
    assert all(node_index(node) not in (0, 1, 2) for node in ids)
    assert new_node_id(range(16)) is None
