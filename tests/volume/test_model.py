"""A seeded state machine against a bytearray model of the volume (in-process, fast).

Operations: writes of any offset and length (unaligned, multi-group), zero, trim, flush,
clean reopen, crash (the process dies: the unflushed tail may be lost), and block-map rebuild
(index deleted). After a crash the volume must equal the model after some prefix of the
operations since the last flush (prefix consistency), and everything flushed is there.
"""

import os
import random
import shutil

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from chunkvol.pool import Pool
from tests.support.faults import abandon

VOLUME_BYTES = 1 << 20
BLOCK = 4096


class VolumeMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.directory = None
        self.pool = None

    @initialize(compression=st.sampled_from(["none", "zstd"]))
    def create(self, compression):
        import tempfile
        self.directory = tempfile.mkdtemp(prefix="chunkvol-model-")
        path = os.path.join(self.directory, "pool")
        Pool.create(path, chunk_size=16 << 20)
        with Pool.open(path) as pool:
            pool.create_volume("disk0", VOLUME_BYTES, compression)
        self.path = path
        self.pool = Pool.open(path)
        self.volume = self.pool.volume("disk0")
        self.model = bytearray(VOLUME_BYTES)
        self.since_flush = [bytes(self.model)]  # candidate states after a crash

    def teardown(self):
        if self.pool is not None and not self.pool.closed:
            self.pool.close()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _changed(self):
        self.since_flush.append(bytes(self.model))

    @rule(offset=st.integers(0, VOLUME_BYTES - 1), length=st.integers(1, 200_000),
          kind=st.sampled_from(["random", "text", "zeros"]), fua=st.booleans(), seed=st.integers(0, 2**32))
    def write(self, offset, length, kind, fua, seed):
        length = min(length, VOLUME_BYTES - offset)
        if kind == "random":
            data = random.Random(seed).randbytes(length)  # replays from hypothesis' seed
        elif kind == "text":
            data = (f"block {seed} " * (length // 8 + 1)).encode()[:length]
        else:
            data = bytes(length)
        self.volume.write(data, offset, fua=fua)
        self.model[offset:offset + length] = data
        self._changed()
        if fua:
            self.since_flush = [bytes(self.model)]

    @rule(offset=st.integers(0, VOLUME_BYTES - 1), length=st.integers(1, 300_000), trim=st.booleans())
    def zero(self, offset, length, trim):
        length = min(length, VOLUME_BYTES - offset)
        self.volume.zero(offset, length, trim=trim)
        self.model[offset:offset + length] = bytes(length)
        self._changed()

    @rule()
    def flush(self):
        self.pool.flush()
        self.since_flush = [bytes(self.model)]

    @rule()
    def reopen(self):
        self.pool.close()
        self.pool = Pool.open(self.path)
        self.volume = self.pool.volume("disk0")
        self.since_flush = [bytes(self.model)]

    @rule()
    def crash(self):
        abandon(self.pool)
        self.pool = Pool.open(self.path)
        self.volume = self.pool.volume("disk0")
        content = self._content()
        assert content in self.since_flush, "after a crash the volume is not a prefix state"
        self.model[:] = content
        self.since_flush = [content]

    @precondition(lambda self: self.pool is not None)
    @rule()
    def rebuild_map(self):
        self.pool.close()
        shutil.rmtree(os.path.join(self.path, "index"))
        self.pool = Pool.open(self.path)
        self.volume = self.pool.volume("disk0")

    def _content(self):
        buffer = bytearray(VOLUME_BYTES)
        self.volume.read(buffer, 0)
        return bytes(buffer)

    @invariant()
    def reads_match_model(self):
        if self.pool is None:
            return
        assert self._content() == bytes(self.model)

    @invariant()
    def single_blocks_match_model(self):
        """4 KiB reads take their own fast path: check a spread of them one by one."""
        if self.pool is None:
            return
        buffer = bytearray(BLOCK)
        for offset in range(0, VOLUME_BYTES, 61 * BLOCK):
            self.volume.read(buffer, offset)
            assert buffer == self.model[offset:offset + BLOCK], f"block at {offset}"

    @invariant()
    def holes_read_as_zeros(self):
        if self.pool is None:
            return
        for offset, length, kind in self.volume.extents(0, VOLUME_BYTES):
            if kind == 3:
                assert self.model[offset:offset + length] == bytes(length)


VolumeMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("CHUNKVOL_MODEL_EXAMPLES", "40")), stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestVolumeModel = VolumeMachine.TestCase
