"""For an object store, the shipper reads and encodes the next batch in a read-ahead thread
while the current one is sent (chunkvol/mirror/read_ahead.py). What must still hold:

- the cursor moves only after the target acknowledged a batch: a target that fails (or a
  crash) at the N-th batch leaves it at the batch before, whatever was read ahead, and a
  later ship resumes from there until the mirror equals the source;
- at most two batches exist at once, the one being sent and the one read ahead;
- a stop, a failure or a read error ends the read-ahead thread before `ship` returns.

Real pools and a real object store (tools/objstore_lab.py); nothing here measures time.
"""

import gc
import os
import threading

import pytest

from chunkvol.errors import CorruptionError, UnreachableError
from chunkvol.mirror import config as mirror_config
from chunkvol.mirror import shipper as shipping
from chunkvol.mirror.source import Batch, LogSource
from chunkvol.mirror.targets import DirTarget
from chunkvol.pool import Pool
from chunkvol.storage.files import LocalFiles
from tests.support.faulty_network import FaultyNetwork, StoreFault
from tests.support.mirrors import assert_identical, cv, everything, new_source, write_history
from tests.support.server import chunkvol

BATCH_BYTES = 256 << 10  # small batches: a few dozen of them in a pool of write_history
SAFETY_SECONDS = 60  # only for a test that would otherwise hang; never a measured bound


class Crash(BaseException):
    """The shipper's process dying where it stands (not an error ship() handles)."""


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(shipping, "MAX_BATCH_BYTES", BATCH_BYTES)


def read_ahead_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("chunkvol-read-")]


def written_source(tmp_path, seed=1):
    source = new_source(tmp_path)
    write_history(source, seed, rounds=2)
    return source


def horizon_of(source):
    with Pool.open(source) as pool:
        pool.flush()
        return pool.writer.durable_address


def shipper_for(source, name):
    return shipping.Shipper(source, Pool.read_metadata(source), name, mirror_config.definition_of(source, name))


def expected_batches(source, cursor, horizon):
    """[(end, has records)] of every batch from `cursor`, as the shipper cuts them."""
    log_source = LogSource(source, Pool.read_metadata(source), LocalFiles())
    try:
        return [(batch.end, bool(batch.records))
                for batch in log_source.batches(cursor, horizon, BATCH_BYTES)]
    finally:
        log_source.close()


def cursor_before_nth_send(batches, start, nth):
    """Where the cursor stands when the `nth` batch with records (1-based) is being sent."""
    cursor, sends = start, 0
    for end, has_records in batches:
        if has_records:
            sends += 1
            if sends == nth:
                return cursor
        cursor = end
    raise AssertionError(f"only {sends} batches with records")


def unsynced_dir_mirror(tmp_path):
    """A source with a history and a dir: mirror `m` of it, not synced yet: (source, mirror,
    horizon, the mirror's cursor, the batches from there to the horizon)."""
    source = written_source(tmp_path)
    mirror = str(tmp_path / "mirror")
    cv(source, "mirror", "add", "m", "--to", f"dir:{mirror}")
    horizon = horizon_of(source)
    start = saved_cursor(source, "m")
    return source, mirror, horizon, start, expected_batches(source, start, horizon)


def ship_again(source, name, horizon):
    """A new shipper, as after a restart (the cursor as it is on disk), ships the rest."""
    shipper = shipper_for(source, name)
    try:
        shipper.ship(horizon)
    finally:
        shipper.close()


def saved_cursor(source, name):
    return mirror_config.load_state(source, name, 0)["cursor"]


class HookedTarget:
    """A real target (a dir: mirror pool) with hooks around each send, numbered from 1:
    `before(number, records)` may wait or raise (the batch is not applied), `after(number)`
    may raise once it is (the acknowledgement lost on the way back). It asks for a read-ahead
    as an object store does: the read-ahead's rules do not depend on the target."""

    READ_AHEAD = True

    def __init__(self, path, fields, source_path, before=None, after=None):
        self.inner = DirTarget(path, fields, source_path)
        self.before, self.after = before, after
        self.sends = 0

    def have(self, origin):
        return self.inner.have(origin)

    def send(self, origin, records):
        self.sends += 1
        if self.before is not None:
            self.before(self.sends, records)
        held = self.inner.send(origin, records)
        if self.after is not None:
            self.after(self.sends)
        return held

    def close(self):
        self.inner.close()


def fail_at(nth, error):
    def hook(number, *_):
        if number == nth:
            raise error
    return hook


@pytest.mark.parametrize("kind, applied", [(UnreachableError, False), (UnreachableError, True), (Crash, False),
                                           (Crash, True)],
                         ids=["fails", "fails-after-applying", "crash", "crash-after-applying"])
def test_a_failure_at_the_nth_batch_leaves_the_cursor_at_the_last_acknowledged_one(tmp_path, kind, applied):
    error = kind("the acknowledgement was lost" if applied else "the link went down")
    source, mirror, horizon, start, batches = unsynced_dir_mirror(tmp_path)
    assert sum(has_records for _, has_records in batches) >= 8, "too few batches to fail in the middle"

    shipper = shipper_for(source, "m")
    failing = shipper.target = HookedTarget(mirror, shipper.fields, shipper.pool_path,
                                            **{"after" if applied else "before": fail_at(5, error)})
    with pytest.raises(type(error)):
        shipper.ship(horizon)
    shipper.close()
    assert read_ahead_threads() == []
    assert failing.sends == 5, "nothing is sent after the failure"
    assert saved_cursor(source, "m") == cursor_before_nth_send(batches, start, 5)
    if not isinstance(error, Crash):
        state = mirror_config.load_state(source, "m", 0)
        assert state["state"] == "error" and str(error) in state["last_error"]

    ship_again(source, "m", horizon)
    assert saved_cursor(source, "m") == batches[-1][0]
    assert_identical(source, mirror)


def test_read_ahead_overlaps_sending_and_never_holds_more_than_two_batches(tmp_path):
    source, mirror, horizon, _, _ = unsynced_dir_mirror(tmp_path)
    shipper = shipper_for(source, "m")
    original = shipper.source.batches
    yielded, live_at_yield, index_of, produced = [0], [], {}, set()
    next_read = threading.Condition()
    exhausted = [False]

    def counted(*arguments, **keywords):
        for batch in original(*arguments, **keywords):
            produced.add(id(batch))
            live_at_yield.append(sum(1 for thing in gc.get_objects()
                                     if type(thing) is Batch and id(thing) in produced))
            with next_read:
                yielded[0] += 1
                index_of[id(batch.records)] = yielded[0]
                next_read.notify_all()
            yield batch
        with next_read:
            exhausted[0] = True
            next_read.notify_all()

    shipper.source.batches = counted

    read_during_send = []

    def wait_for_the_next_read(_, records):
        """Holds each batch until the one after it has been read: the reading overlaps the send."""
        with next_read:
            number = index_of.pop(id(records))  # this is the number-th batch read
            assert next_read.wait_for(lambda: yielded[0] > number or exhausted[0], SAFETY_SECONDS)
            read_during_send.append(yielded[0] - number)

    target = shipper.target = HookedTarget(mirror, shipper.fields, shipper.pool_path, before=wait_for_the_next_read)
    try:
        shipper.ship(horizon)
    finally:
        shipper.close()
    assert read_ahead_threads() == []
    assert target.sends >= 8
    assert max(live_at_yield) == 2, live_at_yield
    # Exactly one batch is read while one is sent: the last send has none left to read.
    assert set(read_during_send[:-1]) == {1}, read_during_send
    assert_identical(source, mirror)


def test_stop_during_a_read_ahead_returns_with_no_thread_left(tmp_path):
    source, mirror, horizon, start, batches = unsynced_dir_mirror(tmp_path)
    shipper = shipper_for(source, "m")
    original = shipper.source.batches
    reading_third, gate, closed = threading.Event(), threading.Event(), threading.Event()
    stop = threading.Event()

    def slow_third(*arguments, **keywords):
        try:
            for index, batch in enumerate(original(*arguments, **keywords)):
                if index == 2:
                    reading_third.set()  # in the middle of reading batch 3 ...
                    assert gate.wait(SAFETY_SECONDS)  # ... until the stop has come
                yield batch
        finally:
            closed.set()

    shipper.source.batches = slow_third

    def stop_at_the_second(number, _):
        if number == 2:
            assert reading_third.wait(SAFETY_SECONDS)
            stop.set()
            gate.set()

    assert batches[0][1] and batches[1][1], "the first two batches carry records"
    target = shipper.target = HookedTarget(mirror, shipper.fields, shipper.pool_path, before=stop_at_the_second)
    try:
        assert shipper.ship(horizon, stop=stop) > 0
    finally:
        shipper.close()
    assert read_ahead_threads() == []
    assert closed.is_set(), "the log reader was closed in its thread"
    assert target.sends == 2
    assert saved_cursor(source, "m") == batches[1][0], "the cursor is after the second batch, which was sent"
    state = mirror_config.load_state(source, "m", 0)
    assert state["state"] == "idle" and not state["last_error"]

    ship_again(source, "m", horizon)
    assert_identical(source, mirror)


def test_a_dir_mirror_is_shipped_without_a_read_ahead(tmp_path):
    source, mirror, horizon, _, _ = unsynced_dir_mirror(tmp_path)
    threads_during_send = []
    shipper = shipper_for(source, "m")
    target = shipper.target = HookedTarget(mirror, shipper.fields, shipper.pool_path,
                                           before=lambda *_: threads_during_send.append(len(read_ahead_threads())))
    target.READ_AHEAD = False  # as DirTarget and NodeTarget: their receiver, not the reading, is the limit
    try:
        shipper.ship(horizon)
    finally:
        shipper.close()
    assert target.sends >= 8 and set(threads_during_send) == {0}
    assert_identical(source, mirror)


def test_stop_during_the_bandwidth_wait_sends_nothing_more(tmp_path):
    source = new_source(tmp_path)
    with Pool.open(source) as pool:
        volume = pool.volume("v")
        for index in range(4):
            volume.write(os.urandom(128 << 10), index << 20)
            pool.flush()
    mirror = str(tmp_path / "mirror")
    cv(source, "mirror", "add", "slow", "--to", f"dir:{mirror}", "--bandwidth", "4K")
    horizon = horizon_of(source)
    shipper = shipper_for(source, "slow")

    class StopsWhenWaitedOn(threading.Event):
        """A stop that comes while the shipper waits for the bandwidth limit."""

        def wait(self, timeout=None):
            self.set()
            return True

    target = shipper.target = HookedTarget(mirror, shipper.fields, shipper.pool_path)
    try:
        shipper.ship(horizon, stop=StopsWhenWaitedOn())
    finally:
        shipper.close()
    assert read_ahead_threads() == []
    assert target.sends == 1, "the first batch goes at once; the stop ends the wait for the second"
    with Pool.open(mirror, readonly=True) as pool:
        assert pool.origins, "the first batch is on the mirror"


def test_a_read_error_reaches_the_shipper_after_the_batches_before_it(tmp_path):
    source, mirror, horizon, start, batches = unsynced_dir_mirror(tmp_path)
    shipper = shipper_for(source, "m")
    original = shipper.source.batches

    def damaged_fourth(*arguments, **keywords):
        for index, batch in enumerate(original(*arguments, **keywords)):
            if index == 3:
                raise CorruptionError("cannot ship past damage: a checksum mismatch", "chunk-x", 4096)
            yield batch

    shipper.source.batches = damaged_fourth
    with pytest.raises(CorruptionError, match="cannot ship past damage"):
        shipper.ship(horizon)
    shipper.close()
    assert read_ahead_threads() == []
    state = mirror_config.load_state(source, "m", 0)
    assert state["cursor"] == batches[2][0], "the three batches before the damage were shipped"
    assert state["state"] == "error" and "cannot ship past damage" in state["last_error"]


def test_an_object_store_put_that_fails_discards_the_segment_encoded_ahead(objstore_lab, tmp_path):
    """RADOS: a put fails (before or after the object landed); the segment encoded ahead,
    chained to the lost one, is dropped; the next ship chains from what the store holds and
    a pool restored from the store alone equals the source."""
    url = f"rados:{objstore_lab['ceph_conf']}:{objstore_lab['rados_pool']}"
    source = written_source(tmp_path, seed=7)
    cv(source, "mirror", "add", "r", "--to", url)
    horizon = horizon_of(source)
    start = saved_cursor(source, "r")
    batches = expected_batches(source, start, horizon)

    cursor = start
    for nth, stored in ((4, False), (7, True)):
        expected = cursor_before_nth_send(expected_batches(source, cursor, horizon), cursor, nth)
        threads_during_puts = []

        def count_read_ahead(op, name, seen=threads_during_puts):
            if op == "put":
                seen.append(len(read_ahead_threads()))

        network = FaultyNetwork(store_faults=[StoreFault("put", nth=nth, stored=stored)],
                                store_observer=count_read_ahead)
        shipper = shipping.Shipper(source, Pool.read_metadata(source), "r", mirror_config.definition_of(source, "r"),
                                   network=network)
        with pytest.raises(UnreachableError, match="the store went away"):
            shipper.ship(horizon)
        shipper.close()
        assert read_ahead_threads() == []
        (store,) = network.stores
        assert store.failed[0][0] == "put" and store.failed[0][2] == stored
        assert threads_during_puts == [1] * nth, "the next segment is read and encoded meanwhile; " \
                                                 "nothing is put after the failure"
        cursor = saved_cursor(source, "r")
        assert cursor == expected

    ship_again(source, "r", horizon)
    assert saved_cursor(source, "r") == batches[-1][0]
    restored = str(tmp_path / "restored")
    chunkvol("restore", "--from", url, "--pool", restored, "--pool-uuid", Pool.read_metadata(source)["pool_uuid"])
    assert everything(restored) == everything(source)
