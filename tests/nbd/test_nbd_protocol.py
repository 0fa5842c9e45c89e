"""The NBD protocol as clients use it: every callback and flag of chunkvol's nbdkit plugin,
through a real nbdkit server and libnbd, checked against a bytearray model of the volume and,
where it matters, against what is on disk after the server is gone.

Fixtures (tests/conftest.py): `pool_path` (16 MiB chunks, 64 MiB volume disk0),
`server_factory(pool, *plugin_keys)`, `server`.
"""

import json
import os
import random
import subprocess

import nbd
import pytest

import chunkvol
from chunkvol.pool import Pool
from tests.support.ondisk import chunk_files, log_records, volume_id
from tests.support.server import ENVIRONMENT, PLUGIN, chunkvol as run_chunkvol

KiB = 1024
MiB = 1024 * KiB
VOLUME_SIZE = 64 * MiB
BLOCK = 4096
GROUP = 64 * KiB
MAX_REQUEST = 32 * MiB

# Record layout (format/record.py, docs/FORMAT.md): 72-byte header, then stored_length bytes.
EXTENT, ZERO, COMMIT = 1, 2, 3
FLAG_ZSTD, FLAG_TRIM = 1, 2


# ---- helpers ----------------------------------------------------------------------------

class Model:
    """What the volume must read as."""

    def __init__(self, size=VOLUME_SIZE):
        self.data = bytearray(size)

    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data

    def zero(self, offset, length):
        self.data[offset:offset + length] = bytes(length)


def assert_reads(handle, model, offset=0, length=None, step=8 * MiB):
    """The export reads exactly as the model over [offset, offset+length)."""
    end = len(model.data) if length is None else offset + length
    position = offset
    while position < end:
        count = min(step, end - position)
        got = handle.pread(count, position)
        want = model.data[position:position + count]
        if got != want:
            first = next(i for i in range(count) if got[i] != want[i])
            raise AssertionError(f"export differs from the model at byte {position + first}: "
                                 f"got {got[first]:#x}, want {want[first]:#x}")
        position += count


def block_status(handle, offset, length, flags=0):
    """One NBD_CMD_BLOCK_STATUS: [(offset, length, state)] for base:allocation."""
    found = []

    def callback(context, start, entries, error):
        if context == nbd.CONTEXT_BASE_ALLOCATION:
            position = start
            for index in range(0, len(entries), 2):
                found.append((position, entries[index], entries[index + 1]))
                position += entries[index]
        return 0

    handle.block_status(length, offset, callback, flags)
    return found


def allocation(handle, offset, length):
    """The merged base:allocation map of [offset, offset+length), asking again as clients do."""
    merged = []
    position = offset
    end = offset + length
    while position < end:
        extents = block_status(handle, position, min(end - position, 1 << 31))
        assert extents and extents[0][0] == position
        for start, size, state in extents:
            size = min(size, end - start)
            if size <= 0:
                break
            if merged and merged[-1][2] == state and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size, state)
            else:
                merged.append((start, size, state))
        position = merged[-1][0] + merged[-1][1]
    return merged




def chunk_bytes(pool):
    return sum(os.path.getsize(path) for path in chunk_files(pool))






def nbdinfo_json(*arguments):
    result = subprocess.run(["/usr/bin/nbdinfo", "--json", *arguments], capture_output=True, text=True,
                            env=ENVIRONMENT, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def errno_of(call, *arguments, **keywords):
    """Run a libnbd call that must fail; return its errno name."""
    with pytest.raises(nbd.Error) as raised:
        call(*arguments, **keywords)
    return raised.value.errno


def wait_for(handle, cookies):
    """Wait until every aio command in `cookies` has completed (each cookie is asked about
    until it completes, then never again: libnbd forgets retired cookies)."""
    pending = list(cookies)
    while pending:
        pending = [cookie for cookie in pending if not handle.aio_command_completed(cookie)]
        if pending:
            handle.poll(1000)


def trim(handle, offset, length, flags=0):
    """NBD_CMD_TRIM of [offset, offset+length) (libnbd takes the count first)."""
    handle.trim(length, offset, flags)


def zero(handle, offset, length, flags=0):
    """NBD_CMD_WRITE_ZEROES of [offset, offset+length)."""
    handle.zero(length, offset, flags)


def stop(server, *handles):
    """A clean stop (SIGTERM: the plugin checkpoints). nbdkit waits for connected clients
    before it exits, so disconnect them first."""
    for handle in handles:
        handle.shutdown()
    server.stop()


def random_bytes(count, seed):
    return random.Random(seed).randbytes(count)


# ---- pread ------------------------------------------------------------------------------

def test_pread_never_written_reads_zeros(server):
    handle = server.connect()
    assert handle.get_size() == VOLUME_SIZE
    assert_reads(handle, Model())
    for offset, count in ((0, 1), (4095, 2), (BLOCK * 3 + 17, 9000), (VOLUME_SIZE - 1, 1),
                          (VOLUME_SIZE - 5000, 5000), (GROUP - 1, GROUP + 2)):
        assert handle.pread(count, offset) == bytes(count)


def test_pread_unaligned_ranges_of_written_data(server):
    handle = server.connect()
    model = Model()
    data = random_bytes(3 * GROUP, 1)
    handle.pwrite(data, GROUP)
    model.write(GROUP, data)
    for offset, count in ((GROUP - 10, 20), (GROUP + 1, 1), (GROUP + 4095, 2), (GROUP + 5000, 70000),
                          (2 * GROUP - 3, 6), (4 * GROUP - 1, 2), (0, 5 * GROUP)):
        assert handle.pread(count, offset) == model.data[offset:offset + count]


# ---- pwrite -----------------------------------------------------------------------------

def test_pwrite_aligned(server):
    handle = server.connect()
    model = Model()
    for index, offset in enumerate((0, BLOCK, 7 * BLOCK, GROUP, 5 * MiB, VOLUME_SIZE - BLOCK)):
        data = random_bytes(BLOCK, 100 + index)
        handle.pwrite(data, offset)
        model.write(offset, data)
    data = random_bytes(GROUP, 7)
    handle.pwrite(data, 10 * GROUP)
    model.write(10 * GROUP, data)
    handle.pwrite(b"\x55" * BLOCK, BLOCK)  # overwrite
    model.write(BLOCK, b"\x55" * BLOCK)
    assert_reads(handle, model)


def test_pwrite_unaligned_single_bytes(server):
    handle = server.connect()
    model = Model()
    base = random_bytes(2 * GROUP, 2)
    handle.pwrite(base, 3 * GROUP)
    model.write(3 * GROUP, base)
    offsets = [1, 4095, 4096 + 7, GROUP - 1, GROUP, 3 * GROUP + 1, 3 * GROUP + BLOCK - 1,
               4 * GROUP + 12345, VOLUME_SIZE - 1, VOLUME_SIZE - BLOCK]
    rng = random.Random(3)
    offsets += [rng.randrange(VOLUME_SIZE) for _ in range(40)]
    for offset in offsets:
        byte = bytes([rng.randrange(1, 256)])
        handle.pwrite(byte, offset)
        model.write(offset, byte)
        assert handle.pread(1, offset) == byte
    assert_reads(handle, model)


def test_pwrite_512_byte_sectors_inside_blocks(server):
    handle = server.connect()
    model = Model()
    # Fill two blocks sector by sector, out of order, the second over existing data.
    existing = random_bytes(BLOCK, 4)
    handle.pwrite(existing, 9 * BLOCK)
    model.write(9 * BLOCK, existing)
    rng = random.Random(5)
    sectors = [8 * BLOCK + 512 * i for i in range(8)] + [9 * BLOCK + 512 * i for i in range(0, 8, 3)]
    rng.shuffle(sectors)
    for offset in sectors:
        data = random_bytes(512, offset)
        handle.pwrite(data, offset)
        model.write(offset, data)
    # Sectors straddling a block and a group boundary.
    for offset, count in ((GROUP - 512, 1024), (5 * BLOCK + 3584, 1536), (VOLUME_SIZE - 512, 512)):
        data = random_bytes(count, offset)
        handle.pwrite(data, offset)
        model.write(offset, data)
    assert_reads(handle, model)


def test_pwrite_spanning_many_groups(server_factory, pool_path):
    server = server_factory(pool_path)
    handle = server.connect()
    model = Model()
    offset = 3 * GROUP + 1000  # unaligned start and end: read-modify-write at both edges
    data = random_bytes(40 * GROUP + 777, 6)
    handle.pwrite(data, offset)
    model.write(offset, data)
    middle = random_bytes(5 * GROUP, 7)  # overwrite across group boundaries, group-aligned
    handle.pwrite(middle, 10 * GROUP)
    model.write(10 * GROUP, middle)
    assert_reads(handle, model, 0, 50 * GROUP)
    handle.flush()
    stop(server, handle)
    # On disk: every EXTENT record lies inside one 64 KiB group, and the first write made one
    # record per group it touched.
    ident = volume_id(pool_path, "disk0")
    extents = [r for r in log_records(pool_path) if r["type"] == EXTENT and r["volume"] == ident]
    for record in extents:
        assert record["length"] % BLOCK == 0 and record["offset"] % BLOCK == 0
        assert record["offset"] // GROUP == (record["offset"] + record["length"] - 1) // GROUP, record
    first_groups = set(range(offset // GROUP, (offset + len(data) - 1) // GROUP + 1))
    assert {r["offset"] // GROUP for r in extents[:len(first_groups)]} == first_groups
    handle = server_factory(pool_path).connect()
    assert_reads(handle, model, 0, 50 * GROUP)


def test_pwrite_maximum_request_32_mib(server_factory, pool_path):
    server = server_factory(pool_path)
    handle = server.connect()
    model = Model()
    data = random_bytes(MAX_REQUEST, 8)
    offset = 5 * BLOCK + 100  # unaligned, so the widened write is a little over 32 MiB
    handle.pwrite(data, offset)
    model.write(offset, data)
    data2 = random_bytes(MAX_REQUEST, 9)
    handle.pwrite(data2, VOLUME_SIZE - MAX_REQUEST)  # up to the very end
    model.write(VOLUME_SIZE - MAX_REQUEST, data2)
    assert handle.pread(MAX_REQUEST, offset) == model.data[offset:offset + MAX_REQUEST]
    assert_reads(handle, model)
    handle.flush()
    server.kill()
    # 64 MiB of data with 16 MiB chunks: the log went on over several chunk files.
    assert len(chunk_files(pool_path)) >= 4
    handle = server_factory(pool_path).connect()
    assert_reads(handle, model)


# ---- flush and FUA ------------------------------------------------------------------------

def test_flush_makes_writes_durable_across_kill(server_factory, pool_path):
    server = server_factory(pool_path)
    handle = server.connect()
    assert handle.can_flush()
    model = Model()
    for index in range(20):
        offset = index * 3 * MiB + index * 513
        data = random_bytes(10000 + index * 1000, 200 + index)
        handle.pwrite(data, offset)
        model.write(offset, data)
    handle.flush()
    handle.flush()  # a flush with nothing new is fine too
    server.kill()
    # What is on disk, read without a server (read-only: the log is replayed, nothing is cut).
    with Pool.open(pool_path, readonly=True) as pool:
        volume = pool.volume("disk0")
        for offset in range(0, VOLUME_SIZE, 8 * MiB):
            buffer = bytearray(8 * MiB)
            volume.read(buffer, offset)
            assert buffer == model.data[offset:offset + 8 * MiB], offset
    handle = server_factory(pool_path).connect()
    assert_reads(handle, model)


def test_flush_with_nothing_written(server):
    handle = server.connect()
    handle.flush()
    handle.flush()
    assert handle.pread(BLOCK, 0) == bytes(BLOCK)


def test_fua_write_durable_across_kill_without_flush(server_factory, pool_path):
    server = server_factory(pool_path)
    handle = server.connect()
    assert handle.can_fua()
    model = Model()
    plain = random_bytes(GROUP, 10)
    handle.pwrite(plain, 0)
    model.write(0, plain)
    data = random_bytes(3 * GROUP + 5, 11)
    handle.pwrite(data, 7 * MiB + 3, nbd.CMD_FLAG_FUA)  # FUA covers this write (and, here, the one before)
    model.write(7 * MiB + 3, data)
    server.kill()
    handle = server_factory(pool_path).connect()
    assert handle.pread(len(data), 7 * MiB + 3) == data
    assert_reads(handle, model)


def test_fua_zero_and_trim_durable_across_kill(server_factory, pool_path):
    server = server_factory(pool_path)
    handle = server.connect()
    model = Model()
    data = random_bytes(4 * MiB, 12)
    handle.pwrite(data, 0)
    handle.flush()
    model.write(0, data)
    zero(handle, GROUP + 100, MiB, nbd.CMD_FLAG_FUA)
    model.zero(GROUP + 100, MiB)
    trim(handle, 2 * MiB, MiB + 5, nbd.CMD_FLAG_FUA)
    model.zero(2 * MiB, MiB + 5)
    server.kill()
    handle = server_factory(pool_path).connect()
    assert_reads(handle, model, 0, 5 * MiB)


# ---- trim ----------------------------------------------------------------------------------

def test_trim_reads_zeros_and_becomes_hole(server_factory, pool_path):
    server = server_factory(pool_path)
    handle = server.connect()
    assert handle.can_trim()
    model = Model()
    data = random_bytes(2 * MiB, 13)
    handle.pwrite(data, MiB)
    model.write(MiB, data)
    trim(handle, MiB, 4 * GROUP)                 # aligned
    model.zero(MiB, 4 * GROUP)
    edge = 2 * MiB + GROUP
    trim(handle, edge + 100, 3 * BLOCK)          # unaligned: partial edge blocks are zeroed
    model.zero(edge + 100, 3 * BLOCK)
    assert_reads(handle, model, 0, 4 * MiB)
    assert allocation(handle, MiB, 4 * GROUP) == [(MiB, 4 * GROUP, 3)]
    assert allocation(handle, edge, 4 * BLOCK) == [(edge, BLOCK, 0), (edge + BLOCK, 2 * BLOCK, 3),
                                                   (edge + 3 * BLOCK, BLOCK, 0)]
    handle.flush()
    stop(server, handle)
    trims = [r for r in log_records(pool_path) if r["type"] == ZERO and r["flags"] & FLAG_TRIM]
    assert any(r["offset"] == MiB and r["length"] == 4 * GROUP for r in trims), trims
    handle = server_factory(pool_path).connect()
    assert_reads(handle, model, 0, 4 * MiB)
    assert allocation(handle, MiB, 4 * GROUP) == [(MiB, 4 * GROUP, 3)]


def test_trim_of_never_written_range(server):
    handle = server.connect()
    trim(handle, 0, 8 * MiB)
    assert allocation(handle, 0, VOLUME_SIZE) == [(0, VOLUME_SIZE, 3)]
    trim(handle, 9 * MiB + 12345, 5 * MiB + 7)
    assert handle.pread(8 * MiB, 8 * MiB) == bytes(8 * MiB)
    # Whole trimmed blocks stay holes (the partly covered edge blocks read as zeros in any case).
    inside = 9 * MiB + 4 * BLOCK
    assert allocation(handle, inside, 5 * MiB - 4 * BLOCK) == [(inside, 5 * MiB - 4 * BLOCK, 3)]


# ---- zero -----------------------------------------------------------------------------------

ZERO_FLAGS = {"plain": 0, "fast_zero": nbd.CMD_FLAG_FAST_ZERO, "no_hole": nbd.CMD_FLAG_NO_HOLE,
              "fast_zero+no_hole": nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE}


def test_zero_with_each_flag(pool_path, server_factory):
    """NBD_CMD_WRITE_ZEROES plain, with FAST_ZERO, with NO_HOLE and with both; each on its own
    volume."""
    for name in ZERO_FLAGS:
        run_chunkvol("--pool", pool_path, "volume", "create", name, "--size", "64M")
    server = server_factory(pool_path)
    for name, flags in ZERO_FLAGS.items():
        check_zero(server.connect(name), flags)


def check_zero(handle, flags):
    assert handle.can_zero() and handle.can_fast_zero()
    model = Model()
    data = random_bytes(3 * MiB, 14)
    handle.pwrite(data, 0)
    model.write(0, data)
    zero(handle, MiB, GROUP, flags)                   # aligned, one whole group
    model.zero(MiB, GROUP)
    zero(handle, 2 * MiB + 10, 5 * GROUP + 17, flags)    # unaligned both ends
    model.zero(2 * MiB + 10, 5 * GROUP + 17)
    zero(handle, 100, 50, flags)                       # inside one block
    model.zero(100, 50)
    zero(handle, BLOCK - 10, 20, flags)                # across one block boundary, no whole block
    model.zero(BLOCK - 10, 20)
    zero(handle, 10 * MiB, 2 * MiB, flags)             # never written
    assert_reads(handle, model, 0, 13 * MiB)
    # Zeroed whole blocks read as zeros in block status (the zero bit), whatever the hole bit.
    for start, size, state in allocation(handle, MiB, GROUP) + allocation(handle, 2 * MiB + BLOCK, 4 * GROUP):
        assert state & nbd.STATE_ZERO, (start, size, state)
    # A partly zeroed block still holds data.
    assert allocation(handle, 0, BLOCK) == [(0, BLOCK, 0)]


def test_zero_is_a_zero_record_on_disk(server_factory, pool_path):
    server = server_factory(pool_path)
    handle = server.connect()
    handle.pwrite(random_bytes(MiB, 15), 0)
    zero(handle, 0, MiB)
    handle.flush()
    stop(server, handle)
    zeros = [r for r in log_records(pool_path) if r["type"] == ZERO]
    assert any(r["offset"] == 0 and r["length"] == MiB and not r["flags"] & FLAG_TRIM for r in zeros)
    handle = server_factory(pool_path).connect()
    assert handle.pread(MiB, 0) == bytes(MiB)


def test_fast_zero_over_many_groups_writes_no_data(server_factory, pool_path):
    server = server_factory(pool_path)
    handle = server.connect()
    handle.pwrite(random_bytes(MiB, 16), 0)
    handle.flush()
    before = chunk_bytes(pool_path)
    zero(handle, 0, VOLUME_SIZE, nbd.CMD_FLAG_FAST_ZERO)  # the whole volume
    handle.flush()
    assert handle.pread(MiB, 0) == bytes(MiB)
    assert allocation(handle, 0, VOLUME_SIZE) == [(0, VOLUME_SIZE, 3)]
    assert chunk_bytes(pool_path) - before < 64 * KiB  # one small record, not 64 MiB of zeros


# ---- block status -----------------------------------------------------------------------------

def test_block_status_never_written_is_hole_and_zero(server):
    handle = server.connect()
    assert handle.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    extents = block_status(handle, 0, VOLUME_SIZE)
    assert extents[0][0] == 0 and extents[0][2] == nbd.STATE_HOLE | nbd.STATE_ZERO
    assert allocation(handle, 0, VOLUME_SIZE) == [(0, VOLUME_SIZE, 3)]
    assert allocation(handle, 12345, 777) == [(12345, 777, 3)]


def test_block_status_written_is_data(server):
    handle = server.connect()
    handle.pwrite(b"x" * BLOCK, 2 * BLOCK)
    handle.pwrite(b"y", 3 * GROUP + 10)          # one byte: its whole block becomes data
    handle.pwrite(random_bytes(2 * GROUP, 17), 5 * MiB)
    assert allocation(handle, 0, 6 * MiB) == [
        (0, 2 * BLOCK, 3), (2 * BLOCK, BLOCK, 0), (3 * BLOCK, 3 * GROUP - 3 * BLOCK, 3),
        (3 * GROUP, BLOCK, 0), (3 * GROUP + BLOCK, 5 * MiB - 3 * GROUP - BLOCK, 3),
        (5 * MiB, 2 * GROUP, 0), (5 * MiB + 2 * GROUP, MiB - 2 * GROUP, 3)]
    # Asked from inside a data block, the answer starts at the asked offset.
    assert allocation(handle, 2 * BLOCK + 100, 200) == [(2 * BLOCK + 100, 200, 0)]
    # Written zeros are still data (allocated), not a hole.
    handle.pwrite(bytes(BLOCK), 20 * MiB)
    assert allocation(handle, 20 * MiB, BLOCK)[0][2] & nbd.STATE_HOLE == 0


def test_block_status_trimmed_is_hole(server):
    handle = server.connect()
    handle.pwrite(random_bytes(4 * GROUP, 18), 0)
    assert allocation(handle, 0, 4 * GROUP) == [(0, 4 * GROUP, 0)]
    trim(handle, GROUP, BLOCK * 3)
    trim(handle, 3 * GROUP, GROUP)
    assert allocation(handle, 0, 4 * GROUP) == [
        (0, GROUP, 0), (GROUP, 3 * BLOCK, 3), (GROUP + 3 * BLOCK, 2 * GROUP - 3 * BLOCK, 0), (3 * GROUP, GROUP, 3)]


def test_block_status_req_one(server):
    handle = server.connect()
    handle.pwrite(b"z" * (2 * BLOCK), GROUP)
    first = block_status(handle, 0, 4 * GROUP, nbd.CMD_FLAG_REQ_ONE)
    assert first == [(0, GROUP, 3)]
    second = block_status(handle, GROUP, 4 * GROUP, nbd.CMD_FLAG_REQ_ONE)
    assert second == [(GROUP, 2 * BLOCK, 0)]
    third = block_status(handle, GROUP + 2 * BLOCK, 4 * GROUP, nbd.CMD_FLAG_REQ_ONE)
    assert len(third) == 1 and third[0][0] == GROUP + 2 * BLOCK and third[0][2] == 3
    assert 0 < third[0][1] <= 4 * GROUP


def test_block_status_survives_restart(server_factory, pool_path):
    server = server_factory(pool_path)
    handle = server.connect()
    handle.pwrite(random_bytes(GROUP, 19), 4 * MiB)
    trim(handle, 4 * MiB + BLOCK, BLOCK)
    handle.flush()
    expected = allocation(handle, 0, VOLUME_SIZE)
    assert expected == [(0, 4 * MiB, 3), (4 * MiB, BLOCK, 0), (4 * MiB + BLOCK, BLOCK, 3),
                        (4 * MiB + 2 * BLOCK, GROUP - 2 * BLOCK, 0), (4 * MiB + GROUP, VOLUME_SIZE - 4 * MiB - GROUP, 3)]
    server.kill()
    handle = server_factory(pool_path).connect()
    assert allocation(handle, 0, VOLUME_SIZE) == expected


# ---- cache ----------------------------------------------------------------------------------------

def test_cache(server):
    handle = server.connect()
    assert handle.can_cache()
    data = random_bytes(5 * MiB, 20)
    handle.pwrite(data, MiB + 3)
    handle.cache(MiB, 5 * MiB)                   # written (count, offset)
    handle.cache(10 * MiB, VOLUME_SIZE - 10 * MiB)  # never written
    handle.cache(1, 1)
    assert handle.pread(len(data), MiB + 3) == data
    assert handle.pread(MiB, 0) == bytes(MiB)


# ---- multi-conn ------------------------------------------------------------------------------------

def test_multi_conn_flush_on_another_connection_covers_writes(server_factory, pool_path):
    server = server_factory(pool_path)
    writer = server.connect()
    flusher = server.connect()
    assert writer.can_multi_conn() and flusher.can_multi_conn()
    model = Model()
    rng = random.Random(21)
    for index in range(30):
        offset = rng.randrange(VOLUME_SIZE - 100 * KiB)
        data = random_bytes(rng.randrange(1, 100 * KiB), 300 + index)
        writer.pwrite(data, offset)
        model.write(offset, data)
    # Also from the flushing connection, and a zero from a third one.
    own = random_bytes(9000, 22)
    flusher.pwrite(own, 33 * MiB + 1)
    model.write(33 * MiB + 1, own)
    third = server.connect()
    zero(third, 40 * MiB + 5, 3 * MiB)
    model.zero(40 * MiB + 5, 3 * MiB)
    # Every connection sees every acknowledged write at once.
    assert_reads(third, model, 0, 8 * MiB)
    flusher.flush()
    server.kill()
    handle = server_factory(pool_path).connect()
    assert_reads(handle, model)


def test_multi_conn_concurrent_aio_writes(server_factory, pool_path):
    server = server_factory(pool_path)
    handles = [server.connect() for _ in range(3)]
    model = Model()
    # Disjoint regions per connection, many requests in flight on each at once.
    for number, handle in enumerate(handles):
        commands = []
        for index in range(32):
            offset = number * 20 * MiB + index * 300 * KiB + index
            data = random_bytes(200 * KiB + index, 1000 * number + index)
            buffer = nbd.Buffer.from_bytearray(bytearray(data))
            commands.append((handle.aio_pwrite(buffer, offset), buffer))
            model.write(offset, data)
        wait_for(handle, [cookie for cookie, _ in commands])
    handles[-1].flush()
    server.kill()
    handle = server_factory(pool_path).connect()
    assert_reads(handle, model)


# ---- exports ----------------------------------------------------------------------------------------

def test_list_exports_shows_every_volume(pool_path, server_factory):
    run_chunkvol("--pool", pool_path, "volume", "create", "disk1", "--size", "8M", "--compression", "zstd")
    run_chunkvol("--pool", pool_path, "volume", "create", "a.b_c+d-e", "--size", "4096")
    server = server_factory(pool_path)
    listing = nbdinfo_json("--list", server.uri(""))
    exports = {row["export-name"]: row for row in listing["exports"]}
    assert set(exports) == {"disk0", "disk1", "a.b_c+d-e"}
    assert exports["disk0"]["export-size"] == VOLUME_SIZE
    assert exports["disk1"]["export-size"] == 8 * MiB
    assert exports["a.b_c+d-e"]["export-size"] == 4096
    # libnbd's option mode sees the same list.
    handle = server.connect(None)
    names = []
    handle.opt_list(lambda name, description: names.append(name) or 0)
    handle.opt_abort()
    assert sorted(names) == sorted(exports)


def test_export_names_select_volumes(pool_path, server_factory):
    run_chunkvol("--pool", pool_path, "volume", "create", "disk1", "--size", "8M")
    server = server_factory(pool_path)
    zero = server.connect("disk0")
    one = server.connect("disk1")
    assert zero.get_size() == VOLUME_SIZE and one.get_size() == 8 * MiB
    one.pwrite(b"one" * 1000, 0)
    zero.pwrite(b"zero" * 1000, 0)
    assert one.pread(3000, 0) == b"one" * 1000
    assert zero.pread(4000, 0) == b"zero" * 1000
    # With two volumes there is no default export.
    with pytest.raises(nbd.Error):
        server.connect("")


def test_default_export_is_the_only_volume(server):
    handle = server.connect("")
    assert handle.get_size() == VOLUME_SIZE
    named = nbd.NBD()
    named.set_full_info(True)
    named.set_export_name("")
    named.connect_unix(server.socket_path)
    assert named.get_canonical_export_name() == "disk0"
    handle.pwrite(b"d" * BLOCK, 0)
    assert server.connect("disk0").pread(BLOCK, 0) == b"d" * BLOCK


def test_volume_key_sets_default_export(pool_path, server_factory):
    run_chunkvol("--pool", pool_path, "volume", "create", "disk1", "--size", "8M")
    server = server_factory(pool_path, "volume=disk1")
    assert server.connect("").get_size() == 8 * MiB
    assert server.connect("disk0").get_size() == VOLUME_SIZE


def test_unknown_export_refused_clearly(server):
    for name in ("nosuch", "disk0x", "DISK0", "disk0/", "../disk0", "disk0@nosnap", "x" * 4096):
        with pytest.raises(nbd.Error) as raised:
            server.connect(name)
        assert "no export named" in str(raised.value), str(raised.value)[:200]
        assert raised.value.errno == "ENOENT"
    # The server goes on serving.
    assert server.connect("disk0").pread(BLOCK, 0) == bytes(BLOCK)


# ---- readonly ---------------------------------------------------------------------------------------

def test_readonly_key_refuses_writes(pool_path, server_factory):
    server = server_factory(pool_path)
    handle = server.connect()
    data = random_bytes(MiB, 23)
    handle.pwrite(data, 0)
    handle.flush()
    stop(server, handle)
    before = {path: open(path, "rb").read() for path in chunk_files(pool_path)}

    server = server_factory(pool_path, "readonly=true")
    handle = server.connect()
    assert handle.is_read_only()
    assert handle.pread(MiB, 0) == data
    # libnbd refuses on its own; with its checks off the server refuses too.
    assert errno_of(handle.pwrite, b"x" * BLOCK, 0) in ("EPERM", "EROFS")
    handle.set_strict_mode(0)
    assert errno_of(handle.pwrite, b"x" * BLOCK, 0) in ("EPERM", "EROFS")
    assert errno_of(handle.pwrite, b"x", 5, nbd.CMD_FLAG_FUA) in ("EPERM", "EROFS")
    assert errno_of(handle.trim, BLOCK, 0) in ("EPERM", "EROFS")
    assert errno_of(handle.zero, BLOCK, 0) in ("EPERM", "EROFS")
    assert handle.pread(MiB, 0) == data
    assert allocation(handle, 0, 2 * MiB) == [(0, MiB, 0), (MiB, MiB, 3)]
    stop(server, handle)
    assert {path: open(path, "rb").read() for path in chunk_files(pool_path)} == before


def test_readonly_export_accepts_flush(pool_path, server_factory):
    server = server_factory(pool_path, "readonly=true")
    handle = server.connect()
    assert handle.can_flush()
    handle.flush()
    assert handle.pread(BLOCK, 0) == bytes(BLOCK)


# ---- block size hints, thread model, dump-plugin --------------------------------------------------------

def test_block_size_hints(server):
    info = nbdinfo_json(server.uri("disk0"))
    export = info["exports"][0]
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 33554432
    handle = server.connect()
    assert handle.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert handle.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert handle.get_block_size(nbd.SIZE_MAXIMUM) == MAX_REQUEST


def _nbdkit_verbose_log(pool, *keys):
    """Run nbdkit -v with the plugin for one nbdinfo; returns its stderr."""
    result = subprocess.run(["/usr/bin/nbdkit", "-v", "-U", "-", "python", PLUGIN, f"pool={pool}", *keys,
                             "--run", 'nbdinfo "$uri" >/dev/null'],
                            capture_output=True, text=True, env=ENVIRONMENT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_thread_model_key(pool_path, server_factory):
    """serialize is the default (measured faster): nbdkit's serialize_requests, one request at a
    time per connection, never serialize_all_requests (whose lock a silent client in its
    handshake holds); parallel still serves concurrent requests from several connections
    correctly under the pool lock."""
    assert "using thread model: serialize_requests" in _nbdkit_verbose_log(pool_path)
    assert "using thread model: parallel" in _nbdkit_verbose_log(pool_path, "thread_model=parallel")
    server = server_factory(pool_path, "thread_model=parallel")
    handles = [server.connect(), server.connect()]
    model = Model()
    cookies = []
    for number, handle in enumerate(handles):
        for index in range(16):
            offset = number * MiB + index * 50 * KiB
            data = random_bytes(40 * KiB + 7, 50 * number + index)
            buffer = nbd.Buffer.from_bytearray(bytearray(data))
            cookies.append((handle, handle.aio_pwrite(buffer, offset), buffer))
            model.write(offset, data)
    for handle in handles:
        wait_for(handle, [cookie for owner, cookie, _ in cookies if owner is handle])
    handles[0].flush()
    assert_reads(handles[1], model, 0, 2 * MiB)


def test_dump_plugin_prints_chunkvol_version():
    result = subprocess.run(["/usr/bin/nbdkit", "python", PLUGIN, "--dump-plugin"], capture_output=True,
                            text=True, env=ENVIRONMENT, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert lines.get("chunkvol_version") == chunkvol.__version__
    assert "chunkvol_error" not in lines


# ---- compression ------------------------------------------------------------------------------------

def test_zstd_volume_round_trips_and_stores_less(pool_path, server_factory):
    run_chunkvol("--pool", pool_path, "volume", "create", "zdisk", "--size", "16M", "--compression", "zstd")
    server = server_factory(pool_path)
    handle = server.connect("zdisk")
    model = Model(16 * MiB)
    handle.flush()
    start = chunk_bytes(pool_path)

    text = (b"chunkvol compresses this line well. " * 120000)[:4 * MiB]
    handle.pwrite(text, 0)
    model.write(0, text)
    handle.flush()
    after_text = chunk_bytes(pool_path)
    assert after_text - start < len(text) // 8, (after_text - start, len(text))

    noise = random_bytes(MiB, 24)
    handle.pwrite(noise, 5 * MiB)
    model.write(5 * MiB, noise)
    handle.flush()
    assert chunk_bytes(pool_path) - after_text >= len(noise)  # incompressible: stored as is

    # Sub-block and unaligned writes over compressed and raw records, zero and trim.
    for offset, data in ((10, b"A"), (BLOCK - 3, b"boundary"), (GROUP + 512, random_bytes(512, 25)),
                         (5 * MiB + 77, b"noise-edit"), (3 * MiB + 1, random_bytes(3 * GROUP, 26))):
        handle.pwrite(data, offset)
        model.write(offset, data)
    zero(handle, 2 * MiB + 5, GROUP)
    model.zero(2 * MiB + 5, GROUP)
    trim(handle, 5 * MiB + GROUP, GROUP)
    model.zero(5 * MiB + GROUP, GROUP)
    assert_reads(handle, model)
    handle.flush()
    server.kill()

    ident = volume_id(pool_path, "zdisk")
    extents = [r for r in log_records(pool_path) if r["type"] == EXTENT and r["volume"] == ident]
    compressed = [r for r in extents if r["flags"] & FLAG_ZSTD]
    assert compressed and all(r["stored"] < r["length"] for r in compressed)
    raw = [r for r in extents if r["offset"] >= 5 * MiB and r["offset"] < 6 * MiB and not r["flags"] & FLAG_ZSTD]
    assert raw  # random data is kept raw

    handle = server_factory(pool_path).connect("zdisk")
    assert_reads(handle, model)
    assert handle.pread(len(text) - 3 * MiB - 3 * GROUP - 1, 3 * MiB + 3 * GROUP + 1) == \
        model.data[3 * MiB + 3 * GROUP + 1:len(text)]


# ---- a mixed workload against the model -------------------------------------------------------------

def test_random_operations_match_model_and_survive_kill(server_factory, pool_path):
    server = server_factory(pool_path)
    handle = server.connect()
    model = Model()
    rng = random.Random(27)
    for step in range(300):
        kind = rng.random()
        length = rng.choice([1, 511, 512, BLOCK, BLOCK + 1, GROUP, GROUP * 3 + 100, rng.randrange(1, 300 * KiB)])
        offset = rng.randrange(VOLUME_SIZE - length + 1)
        if rng.random() < 0.5:
            offset -= offset % 512
        if kind < 0.6:
            data = rng.randbytes(length)
            handle.pwrite(data, offset, nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0)
            model.write(offset, data)
        elif kind < 0.8:
            zero(handle, offset, length, rng.choice([0, nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_FLAG_NO_HOLE]))
            model.zero(offset, length)
        else:
            trim(handle, offset, length)
            model.zero(offset, length)
        if step % 50 == 49:
            handle.flush()
    assert_reads(handle, model)
    handle.flush()
    server.kill()
    handle = server_factory(pool_path).connect()
    assert_reads(handle, model)


def test_block_status_of_a_large_volume(pool_path, server_factory):
    """Over 4 GiB: the client asks in pieces, the server answers at most a part each time."""
    GiB = 1 << 30
    run_chunkvol("--pool", pool_path, "volume", "create", "big", "--size", "8G")
    server = server_factory(pool_path)
    handle = server.connect("big")
    handle.pwrite(b"a" * BLOCK, 0)
    handle.pwrite(b"b" * GROUP, GiB + GROUP)
    handle.pwrite(b"c" * BLOCK, 5 * GiB)
    handle.pwrite(b"d" * BLOCK, 8 * GiB - BLOCK)
    expected = [(0, BLOCK, 0), (BLOCK, GiB + GROUP - BLOCK, 3), (GiB + GROUP, GROUP, 0),
                (GiB + 2 * GROUP, 4 * GiB - 2 * GROUP, 3), (5 * GiB, BLOCK, 0),
                (5 * GiB + BLOCK, 3 * GiB - 2 * BLOCK, 3), (8 * GiB - BLOCK, BLOCK, 0)]
    assert allocation(handle, 0, 8 * GiB) == expected
    first = block_status(handle, BLOCK, 4 * GiB - BLOCK, nbd.CMD_FLAG_REQ_ONE)
    assert len(first) == 1 and first[0][0] == BLOCK and first[0][2] == 3
    assert first[0][1] <= GiB + GROUP - BLOCK
    handle.flush()
    stop(server, handle)
    handle = server_factory(pool_path).connect("big")
    assert allocation(handle, 0, 8 * GiB) == expected
    zero(handle, 0, 4 * GiB - BLOCK)  # NBD requests are under 4 GiB
    assert allocation(handle, 0, 8 * GiB) == [(0, 5 * GiB, 3)] + expected[4:]
    assert handle.pread(BLOCK, 8 * GiB - BLOCK) == b"d" * BLOCK


def test_pool_without_volumes_lists_no_exports(tmp_path, server_factory):
    pool = str(tmp_path / "empty-pool")
    run_chunkvol("--pool", pool, "init", "--chunk-size", "16M")
    server = server_factory(pool)
    assert nbdinfo_json("--list", server.uri(""))["exports"] == []
    for name in ("", "disk0"):
        with pytest.raises(nbd.Error) as raised:
            server.connect(name)
        assert raised.value.errno == "ENOENT"


def test_concurrent_sub_block_writes_to_the_same_blocks(server_factory, pool_path):
    """Read-modify-write of partial blocks must not lose a neighbour's bytes: many 1-byte and
    512-byte writes to distinct places in the same few blocks, in flight at once on three
    connections."""
    server = server_factory(pool_path)
    handles = [server.connect() for _ in range(3)]
    model = Model()
    rng = random.Random(28)
    places = list(range(0, 4 * BLOCK, 7))  # distinct bytes in four blocks (across two groups' edge)
    places = [GROUP - 2 * BLOCK + place for place in places]
    rng.shuffle(places)
    pending = {id(handle): [] for handle in handles}
    buffers = []
    for index, offset in enumerate(places):
        handle = handles[index % 3]
        byte = bytes([rng.randrange(1, 256)])
        buffer = nbd.Buffer.from_bytearray(bytearray(byte))
        buffers.append(buffer)
        pending[id(handle)].append(handle.aio_pwrite(buffer, offset))
        model.write(offset, byte)
    for handle in handles:
        wait_for(handle, pending[id(handle)])
    assert_reads(handles[0], model, 0, 2 * GROUP)
    handles[1].flush()
    server.kill()
    assert_reads(server_factory(pool_path).connect(), model, 0, 2 * GROUP)


def test_readonly_server_beside_a_writer_reads_consistently(pool_path, server_factory):
    writer = server_factory(pool_path)
    handle = writer.connect()
    old = Model()
    first = random_bytes(MiB, 29)
    handle.pwrite(first, 0)
    old.write(0, first)
    handle.flush()
    reader = server_factory(pool_path, "readonly=true")
    view = reader.connect()
    assert view.pread(MiB, 0) == first
    new = Model()
    new.data[:] = old.data
    second = random_bytes(40 * MiB, 30)  # over two more 16 MiB chunks
    handle.pwrite(second, 0)
    new.write(0, second)
    handle.flush()
    stop(writer, handle)  # the writer checkpoints its block map
    # The read-only export shows one consistent state (the old one or the new one), without errors.
    got = bytearray()
    for offset in range(0, VOLUME_SIZE, 8 * MiB):
        got += view.pread(8 * MiB, offset)
    assert got == old.data or got == new.data
