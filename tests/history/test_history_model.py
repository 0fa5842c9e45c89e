"""A seeded state machine for history (snapshots, rollback, clones, prune, diff) against an
in-memory model (in-process, fast; the history counterpart of tests/volume/test_model.py).

The model: a bytearray per live volume (disk0 and up to two clones, which may be clones of
clones), the bytes of every snapshot at its creation, and the bytes of the point just before
each rollback (readable as `VOL@TIME~N`, the undo that rollback prints). Operations: writes of
any offset and length, zero, trim, flush, snapshot create and remove (refused while a clone
hangs from it), rollback to a snapshot or to a pre-rollback point, clone a snapshot (then write
to the clone), prune with keep 0, diff (two points, or a point and the live volume), compaction
(after rewrites that leave a sealed chunk mostly dead), clean reopen, crash (kill -9: the
unflushed tail may be lost) and block-map rebuild (through compaction's base, once compacted).

Checked after every step: every live volume equals the model; every snapshot and tracked
past point equals its bytes at creation (they never change, whatever happens to the live
volume, its clones, the pool or the block map); holes reported by extents read as zeros;
diffs (each point against live, and against the next point) cover every changed block. After
a crash the pool's volumes together equal the model after some prefix of the operations since
the last flush (snapshot, rollback, clone and prune flush), and the snapshot set is exactly the
model's (creating and removing a snapshot are synced).
"""

import os
import random
import shutil
import tempfile
import time

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from chunkvol import compaction, history
from chunkvol.errors import AlreadyExistsError, ReadOnlyError, UsageError
from chunkvol.pool import Pool
from tests.support.faults import abandon

VOLUME_BYTES = 1 << 20
BLOCK = 4096
MAX_SNAPSHOTS = 8       # live snapshots over all volumes
MAX_CLONES = 2
MAX_TIME_POINTS = 4     # pre-rollback points tracked at once


def _read_all(volume, size=VOLUME_BYTES):
    buffer = bytearray(size)
    volume.read(buffer, 0)
    return bytes(buffer)


def _check_diff(ranges, old, new, label):
    """`ranges` from history.diff must be 4 KiB-aligned, ordered, disjoint, cover every block
    whose bytes differ between `old` and `new`, and a range that says hole reads as zeros."""
    covered = bytearray(len(old) // BLOCK)
    previous_end = 0
    for offset, length, is_data in ranges:
        assert offset % BLOCK == 0 and length % BLOCK == 0 and length > 0, f"{label}: unaligned range {offset}+{length}"
        assert offset >= previous_end, f"{label}: ranges out of order or overlapping at {offset}"
        assert offset + length <= len(old), f"{label}: range {offset}+{length} beyond the volume"
        previous_end = offset + length
        covered[offset // BLOCK:(offset + length) // BLOCK] = b"\1" * (length // BLOCK)
        if not is_data:
            assert new[offset:offset + length] == bytes(length), f"{label}: hole range {offset}+{length} holds data"
    for block in range(len(old) // BLOCK):
        at = block * BLOCK
        if old[at:at + BLOCK] != new[at:at + BLOCK]:
            assert covered[block], f"{label}: block at {at} differs but no range covers it"


class HistoryMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.directory = None
        self.pool = None

    # ---- setup and bookkeeping ----------------------------------------------------------
    @initialize(compression=st.sampled_from(["none", "zstd"]))
    def create(self, compression):
        self.directory = tempfile.mkdtemp(prefix="chunkvol-history-model-")
        path = os.path.join(self.directory, "pool")
        Pool.create(path, chunk_size=16 << 20)
        with Pool.open(path) as pool:
            pool.create_volume("disk0", VOLUME_BYTES, compression)
        self.path = path
        self.pool = Pool.open(path)
        self.live = {"disk0": bytearray(VOLUME_BYTES)}
        self.snapshots = {}     # (volume, name) -> bytes at creation
        self.time_points = {}   # "VOL@TIME~N" -> bytes (the content just before a rollback), oldest first
        self.parents = {}       # clone -> (volume, snapshot) it hangs from
        self.counter = 0
        self.compactions = 0
        self._flushed()

    def teardown(self):
        if self.pool is not None and not self.pool.closed:
            self.pool.close()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _state(self):
        return {name: bytes(content) for name, content in self.live.items()}

    def _flushed(self):
        """Everything so far is durable: after a crash the pool shows this state or a later one."""
        self.since_flush = [self._state()]

    def _changed(self, name):
        state = dict(self.since_flush[-1])
        state[name] = bytes(self.live[name])
        self.since_flush.append(state)

    def _volume(self, name):
        return self.pool.volume(name)

    def _names(self):
        return sorted(self.live)

    def _held(self):
        return set(self.parents.values())

    # ---- writes -----------------------------------------------------------------------
    def _write(self, name, offset, length, kind, fua, seed):
        length = min(length, VOLUME_BYTES - offset)
        if kind == "random":
            payload = random.Random(seed).randbytes(length)  # replays from hypothesis' seed
        elif kind == "text":
            payload = (f"block {seed} " * (length // 8 + 1)).encode()[:length]
        else:
            payload = bytes(length)
        self._volume(name).write(payload, offset, fua=fua)
        self.live[name][offset:offset + length] = payload
        self._changed(name)
        if fua:
            self._flushed()

    @rule(data=st.data(), offset=st.integers(0, VOLUME_BYTES - 1), length=st.integers(1, 200_000),
          kind=st.sampled_from(["random", "text", "zeros"]), fua=st.booleans(), seed=st.integers(0, 2**32))
    def write(self, data, offset, length, kind, fua, seed):
        self._write(data.draw(st.sampled_from(self._names()), label="volume"), offset, length, kind, fua, seed)

    @rule(group=st.integers(0, VOLUME_BYTES // 65536 - 1), groups=st.integers(1, 4),
          kind=st.sampled_from(["random", "text"]), seed=st.integers(0, 2**32))
    def write_disk0_groups(self, group, groups, kind, seed):
        """Whole 64 KiB groups of the parent (clones read the ones they never wrote from it)."""
        self._write("disk0", group * 65536, groups * 65536, kind, False, seed)

    @rule(data=st.data(), block=st.integers(0, VOLUME_BYTES // BLOCK - 1), skew=st.integers(0, BLOCK - 1),
          length=st.integers(1, 3 * BLOCK), seed=st.integers(0, 2**32))
    def small_write(self, data, block, skew, length, seed):
        """A few blocks or part of one, often unaligned (read-modify-write of edge blocks)."""
        name = data.draw(st.sampled_from(self._names()), label="volume")
        self._write(name, block * BLOCK + skew, length, "text", False, seed)

    @rule(data=st.data(), offset=st.integers(0, VOLUME_BYTES - 1), length=st.integers(1, 300_000),
          trim=st.booleans())
    def zero(self, data, offset, length, trim):
        name = data.draw(st.sampled_from(self._names()), label="volume")
        length = min(length, VOLUME_BYTES - offset)
        volume = self._volume(name)
        if trim:
            volume.trim(offset, length)
        else:
            volume.zero(offset, length)
        self.live[name][offset:offset + length] = bytes(length)
        self._changed(name)

    @rule()
    def flush(self):
        self._volume("disk0").flush()
        self._flushed()

    # ---- snapshots --------------------------------------------------------------------
    @precondition(lambda self: self.pool is not None and len(self.snapshots) < MAX_SNAPSHOTS)
    @rule(data=st.data(), style=st.sampled_from(["plain", "punctuated"]))
    def create_snapshot(self, data, style):
        name = data.draw(st.sampled_from(self._names()), label="volume")
        self.counter += 1
        snapshot = f"s{self.counter}" if style == "plain" else f"{self.counter}.snap_x+y-z"
        info = history.create_snapshot(self.pool, name, snapshot)
        assert info["name"] == snapshot and info["size"] == VOLUME_BYTES
        self.snapshots[(name, snapshot)] = bytes(self.live[name])
        self._flushed()
        with pytest.raises(AlreadyExistsError):
            history.create_snapshot(self.pool, name, snapshot)

    @precondition(lambda self: self.pool is not None and self.snapshots)
    @rule(data=st.data())
    def remove_snapshot(self, data):
        name, snapshot = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        if (name, snapshot) in self._held():
            with pytest.raises(UsageError):
                history.remove_snapshot(self.pool, name, snapshot)
            return
        history.remove_snapshot(self.pool, name, snapshot)
        del self.snapshots[(name, snapshot)]

    @precondition(lambda self: self.pool is not None and self.snapshots)
    @rule(data=st.data())
    def snapshot_is_read_only(self, data):
        name, snapshot = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        view = self._volume(f"{name}@{snapshot}")
        with pytest.raises(ReadOnlyError):
            view.write(b"x" * BLOCK, 0)
        with pytest.raises(ReadOnlyError):
            view.zero(0, BLOCK)
        rows = history.snapshot_rows(self.pool, name)
        assert {row["name"] for row in rows} == {s for v, s in self.snapshots if v == name}

    # ---- rollback ---------------------------------------------------------------------
    @precondition(lambda self: self.pool is not None and (self.snapshots or self.time_points))
    @rule(data=st.data(), flush_first=st.booleans(), to_time=st.booleans())
    def rollback(self, data, flush_first, to_time):
        """To a snapshot, or (to_time) to a tracked VOL@<time> point when there is one."""
        if (to_time or not self.snapshots) and self.time_points:
            target = data.draw(st.sampled_from(list(self.time_points)), label="time point")
            name = target.partition("@")[0]
            content = self.time_points[target]
        else:
            name, snapshot = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
            target = f"{name}@{snapshot}"
            content = self.snapshots[(name, snapshot)]
        if flush_first:
            # The point before the rollback then lies in an earlier millisecond than the
            # rollback's own flush point, so it can also be named by its millisecond.
            self.pool.flush()
            time.sleep(0.003)
        before_content = bytes(self.live[name])
        point, before, after = history.rollback(self.pool, target)
        assert point.label == target and before < after
        self.live[name][:] = content
        self._flushed()
        # The content just before the rollback stays readable (and can be rolled back to) as
        # VOL@TIME~N, the exact point `chunkvol snapshot rollback` prints as its undo.
        exact = f"{name}@{history.format_point(before)}"
        assert _read_all(self._volume(exact)) == before_content, f"{exact}: not the content before the rollback"
        self.time_points[exact] = before_content
        while len(self.time_points) > MAX_TIME_POINTS:
            del self.time_points[next(iter(self.time_points))]
        # And as VOL@TIME (milliseconds) when no later point shares that millisecond: always
        # so after flush_first.
        label = f"{name}@{history.format_stamp(before)}"
        separate = history.stamp_of_time(label.partition("@")[2]) < after
        assert separate or not flush_first, f"{label}: {before} and {after} in one millisecond after a sleep"
        if separate:
            assert _read_all(self._volume(label)) == before_content, f"{label}: not the content before the rollback"

    # ---- clones -----------------------------------------------------------------------
    @precondition(lambda self: self.pool is not None and self.snapshots and len(self.parents) < MAX_CLONES)
    @rule(data=st.data())
    def clone(self, data):
        name, snapshot = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        new_name = f"clone{len(self.parents) + 1}"
        for label in list(self.time_points)[:1]:
            with pytest.raises(UsageError):  # only snapshots can be cloned
                history.clone(self.pool, label, new_name)
        info = history.clone(self.pool, f"{name}@{snapshot}", new_name)
        assert info.name == new_name and info.size_bytes == VOLUME_BYTES
        self.parents[new_name] = (name, snapshot)
        self.live[new_name] = bytearray(self.snapshots[(name, snapshot)])
        self._flushed()

    # ---- prune and diff ---------------------------------------------------------------
    @rule(data=st.data())
    def prune(self, data):
        name = data.draw(st.sampled_from(self._names()), label="volume")
        history.prune(self.pool, name, keep_seconds=0)
        self._flushed()
        # This volume's past times may now lie before its retention window (refused then, never
        # wrong). Whether they do depends on the clock (a point in the prune's millisecond
        # stays), so stop tracking them either way: the draws must not depend on the clock.
        retained_from = self.pool.volume_info(name).retained_from
        for label in [label for label in self.time_points if label.partition("@")[0] == name]:
            content = self.time_points.pop(label)
            if history.stamp_of_time(label.partition("@")[2]) < retained_from:
                with pytest.raises(UsageError):
                    self._volume(label)
            else:
                assert _read_all(self._volume(label)) == content, f"{label} changed by a prune that kept it"

    def _points_of(self, name):
        """{label: content} of the volume's snapshots (by name) then its tracked times (oldest
        first): an order that does not depend on the clock, so hypothesis can replay draws."""
        points = {f"{volume}@{snapshot}": self.snapshots[(volume, snapshot)]
                  for volume, snapshot in sorted(self.snapshots) if volume == name}
        points.update({label: content for label, content in self.time_points.items()
                       if label.partition("@")[0] == name})
        return points

    @precondition(lambda self: self.pool is not None and (self.snapshots or self.time_points))
    @rule(data=st.data(), to_live=st.booleans())
    def diff(self, data, to_live):
        names = sorted({volume for volume, _ in self.snapshots}
                       | {label.partition("@")[0] for label in self.time_points})
        name = data.draw(st.sampled_from(names), label="volume")
        points = self._points_of(name)
        start = data.draw(st.sampled_from(list(points)), label="from")
        if to_live:
            end, new = None, bytes(self.live[name])
        else:
            end = data.draw(st.sampled_from(list(points)), label="to")
            new = points[end]
        ranges = history.diff(self.pool, start, end)
        _check_diff(ranges, points[start], new, f"diff {start} {end or name}")

    # ---- compaction ---------------------------------------------------------------------
    @precondition(lambda self: self.pool is not None and self.compactions < 1)
    @rule(data=st.data())
    def compact(self, data):
        """Rewrite a volume with its own content until a chunk is sealed full of records no
        flush point kept (only the last rewrite is sealed), then compact: nothing any point
        reads may change (the invariants check every one, and later steps rebuild the map)."""
        self.compactions += 1
        name = data.draw(st.sampled_from(self._names()), label="volume")
        volume = self._volume(name)
        content = bytes(self.live[name])
        first_chunk = self.pool.writer.position >> 40
        for _ in range(64):
            if (self.pool.writer.position >> 40) > first_chunk + 1:
                break
            volume.write(content, 0)
        volume.flush()
        self._flushed()
        report = compaction.compact(self.pool, min_dead=0.5)
        assert not report["skipped"], report
        assert set(report["victims"]).isdisjoint(self.pool.chunks.ids())

    # ---- the pool: reopen, crash, rebuild ---------------------------------------------
    @rule()
    def reopen(self):
        self.pool.close()
        self.pool = Pool.open(self.path)
        self._flushed()

    @rule()
    def crash(self):
        abandon(self.pool)
        self.pool = Pool.open(self.path)
        assert sorted(self.pool.volumes) == self._names(), "volumes lost or gained in the crash"
        found = {name: _read_all(self._volume(name)) for name in self._names()}
        assert found in self.since_flush, (
            "after a crash the volumes are not a prefix state of the operations since the last flush: "
            + ", ".join(f"{name} matches {[i for i, s in enumerate(self.since_flush) if s[name] == found[name]]}"
                        f" of {len(self.since_flush)}" for name in self._names()))
        for name, content in found.items():
            self.live[name][:] = content
        self._flushed()

    @rule()
    def rebuild_map(self):
        self.pool.close()
        shutil.rmtree(os.path.join(self.path, "index"))
        self.pool = Pool.open(self.path)

    # ---- invariants -------------------------------------------------------------------
    @invariant()
    def volumes_match_model(self):
        if self.pool is None:
            return
        assert sorted(self.pool.volumes) == self._names()
        for name in self._names():
            assert _read_all(self._volume(name)) == bytes(self.live[name]), f"live volume {name} differs from the model"

    @invariant()
    def single_blocks_match_model(self):
        """4 KiB reads take their own fast path: check a spread of them one by one."""
        if self.pool is None:
            return
        buffer = bytearray(BLOCK)
        for name in self._names():
            volume = self._volume(name)
            for offset in range(0, VOLUME_BYTES, 61 * BLOCK):
                volume.read(buffer, offset)
                assert buffer == self.live[name][offset:offset + BLOCK], f"{name}: block at {offset}"

    @invariant()
    def snapshot_set_matches_model(self):
        if self.pool is None:
            return
        found = {(info.name, snapshot) for info in self.pool.volumes.values()
                 for snapshot in self.pool.snapshots.get(info.volume_id, {})}
        assert found == set(self.snapshots)

    @invariant()
    def points_never_change(self):
        if self.pool is None:
            return
        points = {f"{volume}@{snapshot}": content for (volume, snapshot), content in self.snapshots.items()}
        points.update(self.time_points)
        for label, content in points.items():
            view = self._volume(label)
            assert _read_all(view) == content, f"{label} changed"
            for offset, length, kind in view.extents(0, VOLUME_BYTES):
                if kind == 3:
                    assert content[offset:offset + length] == bytes(length), f"{label}: hole at {offset} holds data"

    @invariant()
    def diffs_cover_changes(self):
        """Every point against the live volume, and each point against the next one (the diff
        rule draws other pairs, both ways)."""
        if self.pool is None:
            return
        for name in self._names():
            points = list(self._points_of(name).items())
            for label, content in points:
                _check_diff(history.diff(self.pool, label, None), content, bytes(self.live[name]),
                            f"diff {label} {name}")
            for (old_label, old), (new_label, new) in zip(points, points[1:]):
                _check_diff(history.diff(self.pool, old_label, new_label), old, new, f"diff {old_label} {new_label}")

    @invariant()
    def holes_read_as_zeros(self):
        if self.pool is None:
            return
        for name in self._names():
            for offset, length, kind in self._volume(name).extents(0, VOLUME_BYTES):
                if kind == 3:
                    assert self.live[name][offset:offset + length] == bytes(length), f"{name}: hole at {offset}"


HistoryMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("CHUNKVOL_HISTORY_MODEL_EXAMPLES", "40")), stateful_step_count=30,
    deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestHistoryModel = HistoryMachine.TestCase
