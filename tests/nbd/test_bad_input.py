"""Bad input gets a clear error and loses nothing (DESIGN.md, guarantee 7): out-of-range and
odd NBD requests, wrong plugin keys, missing or foreign pools, damaged chunk files and pool
metadata, corrupted and hostile records. Always through a real nbdkit server and libnbd.
"""

import json
import os
import random
import shutil
import struct
import subprocess

import nbd
import pytest

from chunkvol.format.record import encode_header_into
from tests.support.ondisk import DATA_OFFSET, HEADER_SIZE, chunk_files, log_records, volume_id
from tests.support.server import ENVIRONMENT, PLUGIN, NbdServer, chunkvol as run_chunkvol

KiB = 1024
MiB = 1024 * KiB
VOLUME_SIZE = 64 * MiB
BLOCK = 4096
GROUP = 64 * KiB

# Record layout (format/record.py, docs/FORMAT.md): 72-byte header, then stored_length bytes.
EXTENT = 1
FLAG_ZSTD = 1


# ---- helpers ----------------------------------------------------------------------------

def random_bytes(count, seed):
    return random.Random(seed).randbytes(count)








def flip_byte(path, position):
    with open(path, "r+b") as handle:
        handle.seek(position)
        value = handle.read(1)[0]
        handle.seek(position)
        handle.write(bytes([value ^ 0x5A]))


def file_snapshot(pool):
    """Contents of every file of the pool but the index and the lock."""
    snapshot = {}
    for directory, _, names in os.walk(pool):
        if os.path.relpath(directory, pool).startswith("index"):
            continue
        for name in names:
            if name != "lock":
                path = os.path.join(directory, name)
                with open(path, "rb") as handle:
                    snapshot[os.path.relpath(path, pool)] = handle.read()
    return snapshot


def run_nbdkit(tmp_path, *keys, timeout=60):
    """nbdkit in the foreground with the plugin; for configurations that must not start.
    Returns the CompletedProcess (it is killed if it is still running at the timeout)."""
    socket_path = str(tmp_path / f"fail{len(os.listdir(tmp_path))}.sock")
    return subprocess.run(["/usr/bin/nbdkit", "-f", "-U", socket_path, "python", PLUGIN, *keys],
                          capture_output=True, text=True, env=ENVIRONMENT, timeout=timeout)


def stop(server, *handles):
    """A clean stop; nbdkit waits for connected clients, so disconnect them first."""
    for handle in handles:
        handle.shutdown()
    server.stop()


def write_and_stop(server, pool, writes, kill=False):
    """Write [(offset, data)] on disk0 and flush; stop cleanly (or kill -9)."""
    handle = server.connect()
    for offset, data in writes:
        handle.pwrite(data, offset)
    handle.flush()
    if kill:
        server.kill()
    else:
        stop(server, handle)


def assert_eio(call, *arguments):
    with pytest.raises(nbd.Error) as raised:
        call(*arguments)
    assert raised.value.errno == "EIO", raised.value


# ---- out-of-range requests -----------------------------------------------------------------

OUT_OF_RANGE = [
    (VOLUME_SIZE, 1),                 # at the end
    (VOLUME_SIZE, BLOCK),
    (VOLUME_SIZE - 1, 2),             # straddling the end
    (VOLUME_SIZE - BLOCK, 2 * BLOCK),
    (VOLUME_SIZE + 1, 512),           # past the end
    (VOLUME_SIZE + (1 << 40), BLOCK),
    ((1 << 63) - 1, 1),               # huge offsets
    ((1 << 63), BLOCK),
    ((1 << 64) - BLOCK, BLOCK),       # offset + count overflows 64 bits
    ((1 << 64) - 1, 1),
]


def out_of_range_calls(handle):
    """(name, call(offset, count)) for every request type that takes a range."""
    return [
        ("pread", lambda offset, count: handle.pread(count, offset)),
        ("pwrite", lambda offset, count: handle.pwrite(b"\xee" * count, offset)),
        ("pwrite_fua", lambda offset, count: handle.pwrite(b"\xee" * count, offset, nbd.CMD_FLAG_FUA)),
        ("trim", lambda offset, count: handle.trim(count, offset)),
        ("zero", lambda offset, count: handle.zero(count, offset)),
        ("fast_zero", lambda offset, count: handle.zero(count, offset, nbd.CMD_FLAG_FAST_ZERO)),
        ("cache", lambda offset, count: handle.cache(count, offset)),
        ("block_status", lambda offset, count: handle.block_status(count, offset, lambda *a: 0)),
    ]


def test_out_of_range_requests_fail_and_change_nothing(server, pool_path):
    handle = server.connect()
    head = random_bytes(MiB, 1)
    tail = random_bytes(MiB, 2)
    handle.pwrite(head, 0)
    handle.pwrite(tail, VOLUME_SIZE - MiB)
    handle.flush()
    chunk_bytes = sum(os.path.getsize(path) for path in chunk_files(pool_path))
    records = len(log_records(pool_path))

    # libnbd checks bounds itself by default: nothing reaches the server.
    for name, call in out_of_range_calls(handle):
        with pytest.raises(nbd.Error):
            call(VOLUME_SIZE - 1, 2)
    # With libnbd's checks off, the server sees every request and must refuse it.
    handle.set_strict_mode(0)
    for name, call in out_of_range_calls(handle):
        for offset, count in OUT_OF_RANGE:
            with pytest.raises(nbd.Error) as raised:
                call(offset, count)
            expected = ("ENOSPC", "EINVAL") if name in ("pwrite", "pwrite_fua", "zero", "fast_zero") else ("EINVAL",)
            assert raised.value.errno in expected, (name, offset, count, raised.value)
            # The connection and the server go on.
            assert handle.pread(1, VOLUME_SIZE - 1) == tail[-1:]

    # Nothing changed: data, allocation, and not one record more in the log.
    assert handle.pread(MiB, 0) == head
    assert handle.pread(MiB, VOLUME_SIZE - MiB) == tail
    assert handle.pread(VOLUME_SIZE - 2 * MiB, MiB) == bytes(VOLUME_SIZE - 2 * MiB)
    handle.flush()
    assert sum(os.path.getsize(path) for path in chunk_files(pool_path)) == chunk_bytes
    assert len(log_records(pool_path)) == records
    other = server.connect()
    assert other.pread(MiB, VOLUME_SIZE - MiB) == tail


def test_zero_length_requests_are_harmless(server, pool_path):
    handle = server.connect()
    data = random_bytes(2 * BLOCK, 3)
    handle.pwrite(data, 0)
    handle.flush()
    records = len(log_records(pool_path))
    handle.set_strict_mode(0)
    calls = [("pread", lambda offset: handle.pread(0, offset)),
             ("pwrite", lambda offset: handle.pwrite(b"", offset)),
             ("trim", lambda offset: handle.trim(0, offset)),
             ("zero", lambda offset: handle.zero(0, offset)),
             ("cache", lambda offset: handle.cache(0, offset)),
             ("block_status", lambda offset: handle.block_status(0, offset, lambda *a: 0))]
    for name, call in calls:
        for offset in (0, BLOCK + 1, VOLUME_SIZE, VOLUME_SIZE + 1):
            try:
                call(offset)  # a no-op is a fine answer
            except nbd.Error as error:
                assert error.errno in ("EINVAL", "ENOSPC"), (name, offset, error)
            assert handle.pread(2 * BLOCK, 0) == data
    handle.flush()
    assert len(log_records(pool_path)) == records


def test_requests_over_the_advertised_maximum(server):
    """The server advertises 32 MiB as the maximum request; a client that sends more must get
    either an error or a correct write, and the server must survive."""
    handle = server.connect()
    handle.set_strict_mode(0)
    data = random_bytes(48 * MiB, 4)
    try:
        handle.pwrite(data, 4 * MiB + 1)
    except nbd.Error as error:
        assert error.errno in ("EINVAL", "ENOMEM", "EOVERFLOW", "ERANGE"), error
        expected = bytes(BLOCK)  # refused whole: nothing written
    else:
        assert handle.pread(32 * MiB, 4 * MiB + 1) == data[:32 * MiB]
        assert handle.pread(16 * MiB, 36 * MiB + 1) == data[32 * MiB:]
        expected = data[:BLOCK]
    with pytest.raises(nbd.Error):
        handle.pread(64 * MiB + 1, 0)  # over the protocol's limit: refused
    assert server.connect().pread(BLOCK, 4 * MiB + 1) == expected


# ---- plugin keys and pool paths ------------------------------------------------------------------

def test_unknown_plugin_key(pool_path, tmp_path):
    result = run_nbdkit(tmp_path, f"pool={pool_path}", "bogus=1")
    assert result.returncode != 0
    assert "bogus" in result.stderr


@pytest.mark.parametrize("key,word", [("readonly=maybe", "maybe"), ("thread_model=fast", "thread_model")])
def test_bad_plugin_key_values(pool_path, tmp_path, key, word):
    result = run_nbdkit(tmp_path, f"pool={pool_path}", key)
    assert result.returncode != 0
    assert word in result.stderr


def test_missing_pool_key(tmp_path):
    result = run_nbdkit(tmp_path)
    assert result.returncode != 0
    assert "pool=" in result.stderr


def test_pool_path_that_does_not_exist(tmp_path):
    missing = str(tmp_path / "no" / "such" / "pool")
    result = run_nbdkit(tmp_path, f"pool={missing}")
    assert result.returncode != 0
    assert missing in result.stderr and "no pool" in result.stderr
    assert not os.path.exists(missing)  # nothing created on the way


def test_pool_path_that_is_not_a_pool(tmp_path):
    directory = tmp_path / "just-a-directory"
    directory.mkdir()
    (directory / "notes.txt").write_text("hello\n")
    regular = tmp_path / "regular-file"
    regular.write_bytes(b"not a pool")
    for path in (directory, regular):
        result = run_nbdkit(tmp_path, f"pool={path}")
        assert result.returncode != 0
        assert str(path) in result.stderr and "no pool" in result.stderr
    assert sorted(os.listdir(directory)) == ["notes.txt"]
    assert regular.read_bytes() == b"not a pool"


def test_second_server_on_a_pool_in_use(pool_path, server_factory, tmp_path):
    first = server_factory(pool_path)
    handle = first.connect()
    handle.pwrite(b"first" * 1000, 0)
    result = run_nbdkit(tmp_path, f"pool={pool_path}")
    assert result.returncode != 0
    assert "in use" in result.stderr and str(first.process.pid) in result.stderr
    assert handle.pread(5000, 0) == b"first" * 1000  # the first server is undisturbed


def test_volume_key_naming_a_missing_volume(pool_path, tmp_path):
    """Like nbdkit's file plugin with a missing file: the server refuses to start, naming it."""
    server = NbdServer(pool_path, str(tmp_path / "nosuch.sock"), "volume=nosuch")
    try:
        with pytest.raises(AssertionError, match="nbdkit exited"):
            server.start()
        assert "volume=nosuch: no such volume" in server.log() and "disk0" in server.log()
    finally:
        server.kill()


# ---- damaged chunk files ------------------------------------------------------------------------------

def _written_pool(pool_path, server_factory):
    """disk0 with 2 MiB of flushed data, the server stopped cleanly; returns the data."""
    data = random_bytes(2 * MiB, 5)
    write_and_stop(server_factory(pool_path), pool_path, [(MiB, data)])
    return data


def _garbage_header(path, other):
    with open(path, "r+b") as handle:
        handle.write(random_bytes(DATA_OFFSET, 6))


def _all_garbage(path, other):
    size = os.path.getsize(path)
    with open(path, "wb") as handle:
        handle.write(random_bytes(size, 7))


def _empty(path, other):
    open(path, "wb").close()


def _short(path, other):
    with open(path, "r+b") as handle:
        handle.truncate(40)


def _zeroed_header(path, other):
    with open(path, "r+b") as handle:
        handle.write(bytes(DATA_OFFSET))


def _header_bit_flip(path, other):
    flip_byte(path, 40)  # capacity field: the header checksum no longer matches


def _from_another_pool(path, other):
    shutil.copyfile(chunk_files(other)[0], path)


@pytest.mark.parametrize("damage", [_garbage_header, _all_garbage, _empty, _short, _zeroed_header,
                                    _header_bit_flip, _from_another_pool],
                         ids=["garbage-header", "all-garbage", "empty", "short", "zeroed-header",
                              "header-bit-flip", "from-another-pool"])
def test_damaged_chunk_file_refused_naming_it(pool_path, server_factory, tmp_path, damage):
    _written_pool(pool_path, server_factory)
    other = str(tmp_path / "other-pool")
    run_chunkvol("--pool", other, "init", "--chunk-size", "16M")
    run_chunkvol("--pool", other, "volume", "create", "disk0", "--size", "64M")
    path = chunk_files(pool_path)[0]
    damage(path, other)
    before = file_snapshot(pool_path)
    result = run_nbdkit(tmp_path, f"pool={pool_path}")
    assert result.returncode != 0
    assert path in result.stderr, result.stderr[-2000:]
    if damage is _from_another_pool:
        assert "another pool" in result.stderr
    # The CLI says the same, as one line, and neither touched the files.
    listing = run_chunkvol("--pool", pool_path, "volume", "list", check=False)
    assert listing.returncode != 0 and path in listing.stderr
    assert "Traceback" not in listing.stderr and len(listing.stderr.strip().splitlines()) == 1
    assert file_snapshot(pool_path) == before


def test_chunk_file_named_for_another_id(pool_path, server_factory, tmp_path):
    _written_pool(pool_path, server_factory)
    path = chunk_files(pool_path)[0]
    renamed = os.path.join(os.path.dirname(path), "chunk-%016x.cvc" % 7)
    os.rename(path, renamed)
    result = run_nbdkit(tmp_path, f"pool={pool_path}")
    assert result.returncode != 0
    assert renamed in result.stderr


def test_stray_files_in_the_chunk_directory_are_ignored(pool_path, server_factory):
    data = _written_pool(pool_path, server_factory)
    chunks = os.path.join(pool_path, "chunks")
    for name in ("README", "chunk-zz.cvc", "chunk-1.cvc", "chunk-0000000000000001.cvc.bak"):
        with open(os.path.join(chunks, name), "wb") as handle:
            handle.write(b"not a chunk")
    handle = server_factory(pool_path).connect()
    assert handle.pread(len(data), MiB) == data


def test_missing_chunk_directory(pool_path, server_factory, tmp_path):
    _written_pool(pool_path, server_factory)
    shutil.rmtree(os.path.join(pool_path, "chunks"))
    result = run_nbdkit(tmp_path, f"pool={pool_path}")
    assert result.returncode != 0
    assert os.path.join(pool_path, "chunks") in result.stderr


def test_garbage_after_the_log_is_cut_as_a_torn_tail(pool_path, server_factory):
    data = _written_pool(pool_path, server_factory)
    path = chunk_files(pool_path)[-1]
    size = os.path.getsize(path)
    with open(path, "ab") as handle:
        handle.write(random_bytes(10000, 8))
    handle = server_factory(pool_path).connect()
    assert handle.pread(len(data), MiB) == data
    assert handle.pread(MiB, 0) == bytes(MiB)
    assert os.path.getsize(path) <= size + HEADER_SIZE + 8 + 1  # the garbage is gone
    handle.pwrite(b"after" * 1000, 0)
    assert handle.pread(5000, 0) == b"after" * 1000


# ---- pool.json ----------------------------------------------------------------------------------------

def _bad_json(text):
    return text[:len(text) // 2]


def _changed_field(text):
    fields = json.loads(text)
    fields["chunk_size"] = fields["chunk_size"] * 2
    return json.dumps(fields, indent=2)


def _unknown_version(text):
    fields = json.loads(text)
    fields["version"] = 99
    return json.dumps(fields, indent=2)


def _not_an_object(text):
    return "[1, 2, 3]\n"


def _empty_text(text):
    return ""


@pytest.mark.parametrize("edit", [_bad_json, _changed_field, _unknown_version, _not_an_object, _empty_text],
                         ids=["bad-json", "changed-field", "unknown-version", "not-an-object", "empty"])
def test_pool_json_edited_by_hand(pool_path, tmp_path, edit):
    metadata = os.path.join(pool_path, "pool.json")
    with open(metadata) as handle:
        text = handle.read()
    edited = edit(text)
    assert edited != text
    with open(metadata, "w") as handle:
        handle.write(edited)
    result = run_nbdkit(tmp_path, f"pool={pool_path}")
    assert result.returncode != 0
    assert metadata in result.stderr, result.stderr[-2000:]
    if edit is _unknown_version:
        assert "99" in result.stderr
    listing = run_chunkvol("--pool", pool_path, "volume", "list", check=False)
    assert listing.returncode == 6, listing
    assert metadata in listing.stderr and len(listing.stderr.strip().splitlines()) == 1
    assert "Traceback" not in listing.stderr
    with open(metadata) as handle:
        assert handle.read() == edited  # left for a human to look at


# ---- corrupted records ----------------------------------------------------------------------------------

def _disk0_extents(pool):
    ident = volume_id(pool, "disk0")
    return [r for r in log_records(pool) if r["type"] == EXTENT and r["volume"] == ident]


def _pick_middle_extent(pool):
    """A whole-group raw EXTENT of disk0 with records after it in the same chunk."""
    extents = [r for r in _disk0_extents(pool) if r["length"] == GROUP and not r["flags"] & FLAG_ZSTD]
    assert len(extents) >= 8
    return extents[len(extents) // 2]


def _check_damaged_range(handle, record, model):
    """The damaged record's range fails with EIO, everything else reads as written."""
    start, length = record["offset"], record["length"]
    assert_eio(handle.pread, length, start)
    assert_eio(handle.pread, 1, start + length - 1)
    assert_eio(handle.pread, 3 * GROUP, start - GROUP)  # a read that spans it fails whole
    assert_eio(handle.cache, length, start)
    assert handle.pread(GROUP, start - GROUP) == model[start - GROUP:start]
    assert handle.pread(GROUP, start + length) == model[start + length:start + length + GROUP]
    for offset in range(0, len(model), 4 * MiB):
        if not offset <= start < offset + 4 * MiB:
            assert handle.pread(4 * MiB, offset) == model[offset:offset + 4 * MiB]
    # The server is alive; the damaged range can be written over, and then reads again.
    fresh = random_bytes(length, 9)
    handle.pwrite(fresh, start)
    assert handle.pread(length, start) == fresh


@pytest.mark.parametrize("stop_kind", ["clean-stop", "kill-9"])
def test_corrupted_payload_byte_in_a_flushed_record(pool_path, server_factory, stop_kind):
    model = bytearray(16 * MiB)
    data = random_bytes(2 * MiB, 10)
    later = random_bytes(MiB, 11)
    model[MiB:3 * MiB] = data
    model[8 * MiB:9 * MiB] = later
    server = server_factory(pool_path)
    handle = server.connect()
    handle.pwrite(data, MiB)
    handle.flush()
    handle.pwrite(later, 8 * MiB)  # flushed records after the damaged one
    handle.flush()
    if stop_kind == "kill-9":
        server.kill()  # recovery replays the log over the damaged record
    else:
        stop(server, handle)  # the checkpoint already maps it
    record = _pick_middle_extent(pool_path)
    assert MiB <= record["offset"] < 3 * MiB
    flip_byte(record["path"], record["position"] + HEADER_SIZE + record["stored"] - 100)
    handle = server_factory(pool_path).connect()
    _check_damaged_range(handle, record, model)


def test_corrupted_header_checksum_of_a_flushed_record(pool_path, server_factory):
    model = bytearray(16 * MiB)
    data = random_bytes(2 * MiB, 12)
    model[MiB:3 * MiB] = data
    write_and_stop(server_factory(pool_path), pool_path, [(MiB, data)], kill=True)
    record = _pick_middle_extent(pool_path)
    flip_byte(record["path"], record["position"] + 66)  # inside header_xxh3
    handle = server_factory(pool_path).connect()
    _check_damaged_range(handle, record, model)


def test_corrupted_last_flushed_record_before_kill(pool_path, server_factory):
    """The damaged record is the last data record before the flush's COMMIT: recovery must
    still tell damage from a torn tail and keep the flushed records around it."""
    model = bytearray(16 * MiB)
    data = random_bytes(4 * GROUP, 13)
    model[2 * MiB:2 * MiB + 4 * GROUP] = data
    write_and_stop(server_factory(pool_path), pool_path, [(2 * MiB, data)], kill=True)
    extents = _disk0_extents(pool_path)
    assert [r["offset"] for r in extents] == [2 * MiB + i * GROUP for i in range(4)]
    record = extents[2]
    flip_byte(record["path"], record["position"] + HEADER_SIZE + record["stored"] - 1)
    handle = server_factory(pool_path).connect()
    assert_eio(handle.pread, GROUP, record["offset"])
    assert handle.pread(2 * GROUP, 2 * MiB) == data[:2 * GROUP]
    assert handle.pread(GROUP, 2 * MiB + 3 * GROUP) == data[3 * GROUP:]


def test_record_copied_over_another(pool_path, server_factory):
    """A misdirected write: one record's bytes land where another record was. The block map
    expects another record there: EIO, never the other record's data."""
    model = bytearray(16 * MiB)
    data = random_bytes(2 * MiB, 14)
    model[MiB:3 * MiB] = data
    write_and_stop(server_factory(pool_path), pool_path, [(MiB, data)])
    extents = [r for r in _disk0_extents(pool_path) if r["length"] == GROUP]
    source, target = extents[3], extents[10]
    assert source["stored"] == target["stored"] and source["path"] == target["path"]
    with open(source["path"], "r+b") as handle:
        handle.seek(source["position"])
        raw = handle.read(HEADER_SIZE + source["stored"])
        handle.seek(target["position"])
        handle.write(raw)
    handle = server_factory(pool_path).connect()
    assert_eio(handle.pread, GROUP, target["offset"])
    assert handle.pread(GROUP, source["offset"]) == model[source["offset"]:source["offset"] + GROUP]
    assert handle.pread(GROUP, target["offset"] - GROUP) == model[target["offset"] - GROUP:target["offset"]]


# ---- hostile zstd frames ----------------------------------------------------------------------------------

def _forge_frame(size, declared, content=b"A"):
    """A zstd frame of exactly `size` bytes: one raw block, with a content size field
    (8 bytes, single segment) that says `declared`."""
    body = size - 4 - 1 - 8 - 3
    assert body >= 0
    return (b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", declared)
            + ((body << 3) | 1).to_bytes(3, "little") + (content * body)[:body])


def _zstd_pool(pool_path, server_factory):
    run_chunkvol("--pool", pool_path, "volume", "create", "zvol", "--size", "8M", "--compression", "zstd")
    text = (b"a compressible line of text; " * 40000)[:MiB]
    server = server_factory(pool_path)
    handle = server.connect("zvol")
    handle.pwrite(text, 0)
    handle.flush()
    stop(server, handle)
    ident = volume_id(pool_path, "zvol")
    compressed = [r for r in log_records(pool_path)
                  if r["type"] == EXTENT and r["volume"] == ident and r["flags"] & FLAG_ZSTD]
    assert len(compressed) == 16
    return text, compressed


def _rewrite_payload(record, payload):
    """Replace a record's payload (same length) and fix its checksums: only the payload is hostile."""
    assert len(payload) == record["stored"]
    header = bytearray(HEADER_SIZE)
    encode_header_into(header, 0, record["type"], record["flags"], record["volume"], payload, record["node"],
                       record["sequence"], record["hlc"], record["offset"], record["length"])
    with open(record["path"], "r+b") as handle:
        handle.seek(record["position"])
        handle.write(bytes(header) + payload)


@pytest.mark.parametrize("declared", [1 << 40, (1 << 64) - 2, 64 * GROUP, GROUP + 1, GROUP],
                         ids=["1TiB", "2^64-2", "4MiB", "group+1", "exact-but-short"])
def test_forged_zstd_frame(pool_path, server_factory, declared):
    text, compressed = _zstd_pool(pool_path, server_factory)
    record = compressed[5]
    assert record["stored"] >= 16
    _rewrite_payload(record, _forge_frame(record["stored"], declared))
    server = server_factory(pool_path)
    handle = server.connect("zvol")
    assert_eio(handle.pread, GROUP, record["offset"])
    assert_eio(handle.pread, 1, record["offset"] + 100)
    # Everything else reads, and the server lives on.
    assert handle.pread(record["offset"], 0) == text[:record["offset"]]
    end = record["offset"] + GROUP
    assert handle.pread(MiB - end, end) == text[end:]
    assert server.connect("zvol").pread(BLOCK, 0) == text[:BLOCK]
    assert "MemoryError" not in server.log()
    assert server.process.poll() is None


# ---- a damaged or foreign block map, a chunk cut short ------------------------------------------------

def _three_chunk_pool(pool_path, server_factory):
    """40 MiB of flushed data on disk0: three 16 MiB chunks; the server stopped cleanly."""
    data = random_bytes(40 * MiB, 15)
    write_and_stop(server_factory(pool_path), pool_path, [(0, data)])
    assert len(chunk_files(pool_path)) == 3
    return data


def test_garbage_block_map_is_rebuilt_from_the_log(pool_path, server_factory):
    data = _three_chunk_pool(pool_path, server_factory)
    with open(os.path.join(pool_path, "index", "data.mdb"), "r+b") as handle:
        handle.write(random_bytes(8192, 16))
    handle = server_factory(pool_path).connect()
    for offset in range(0, 40 * MiB, 8 * MiB):
        assert handle.pread(8 * MiB, offset) == data[offset:offset + 8 * MiB]
    assert handle.pread(MiB, 50 * MiB) == bytes(MiB)


def test_block_map_of_another_pool_is_not_used(pool_path, server_factory, tmp_path):
    data = _three_chunk_pool(pool_path, server_factory)
    other = str(tmp_path / "other-pool")
    run_chunkvol("--pool", other, "init", "--chunk-size", "16M")
    run_chunkvol("--pool", other, "volume", "create", "disk0", "--size", "64M")
    shutil.rmtree(os.path.join(pool_path, "index"))
    shutil.copytree(os.path.join(other, "index"), os.path.join(pool_path, "index"))
    try:
        server = server_factory(pool_path)
    except AssertionError as error:  # refusing, with a clear word, is fine too
        assert "another pool" in str(error)
        return
    handle = server.connect()
    for offset in range(0, 40 * MiB, 8 * MiB):
        assert handle.pread(8 * MiB, offset) == data[offset:offset + 8 * MiB]


def test_chunk_cut_short_in_the_middle_of_the_log(pool_path, server_factory):
    """Chunk 1 loses its second half while chunks 2 and 3 are intact: what it held reads as
    EIO (never as zeros or older data), everything else reads as written."""
    data = _three_chunk_pool(pool_path, server_factory)
    first = chunk_files(pool_path)[0]
    lost = [r for r in _disk0_extents(pool_path) if r["path"] == first and r["position"] >= 8 * MiB]
    assert lost
    os.truncate(first, 8 * MiB)
    handle = server_factory(pool_path).connect()
    for record in lost[1:]:  # the first may straddle the cut
        assert_eio(handle.pread, record["length"], record["offset"])
    assert handle.pread(4 * MiB, 0) == data[:4 * MiB]
    later = lost[-1]["offset"] + GROUP
    assert handle.pread(40 * MiB - later, later) == data[later:]
