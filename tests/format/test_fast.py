"""The compiled hot-path functions (chunkvol/format/fast.c) against their pure-Python
reference (record.REFERENCE, group_map.REFERENCE): the same result, or the same exception
(class, message, args) and the same bytes written, for every input tried. Inputs outside
what the C does itself go to the reference by design; they are tried too."""

import mmap
import os
import random
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import xxhash
from hypothesis import assume, given, settings, strategies as st

from chunkvol.format import group_map, record
from chunkvol.format.group_map import EMPTY_STATE, GROUP_BLOCKS, HOLE, BlockRef
from chunkvol.format.record import BLOCK_SIZE, HEADER_SIZE, MAX_PAYLOAD, RecordType

ROOT = Path(__file__).resolve().parents[2]
EXTENSION = ROOT / "chunkvol" / "format" / f"fast{sysconfig.get_config_var('EXT_SUFFIX')}"
try:
    from chunkvol.format import fast
except ImportError:
    fast = None

needs_fast = pytest.mark.skipif(fast is None, reason="chunkvol.format.fast is not built (make install builds it)")
PY = record.REFERENCE
PY_MAP = group_map.REFERENCE
U64 = (1 << 64) - 1


def outcome(function, *args, **kwargs):
    """What a call did: its result, or its exception as (class, str, args, path, offset)."""
    try:
        return "returned", function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 (any exception must be the same one)
        return "raised", type(error), str(error), error.args, getattr(error, "path", None), \
            getattr(error, "offset", None)


def data_of(seed, length):
    return random.Random(seed).randbytes(length)


# ---- the build ------------------------------------------------------------------------

def test_the_built_extension_imports():
    """A .so in the tree that does not import (a broken build) must not pass unnoticed as
    the pure-Python fallback."""
    if not EXTENSION.exists():
        pytest.skip(f"{EXTENSION.name} is not built (make install builds it)")
    import chunkvol.format.fast as module  # raises on a broken build
    assert module.__file__ == str(EXTENSION)
    if os.environ.get("CHUNKVOL_PURE") != "1":
        assert record.decode_header is module.decode_header
        assert group_map.apply_write is module.apply_write


def names_in_a_fresh_process(pure):
    env = dict(os.environ)
    env.pop("CHUNKVOL_PURE", None)
    if pure:
        env["CHUNKVOL_PURE"] = "1"
    code = (
        "from chunkvol.format import record, group_map\n"
        "from chunkvol import volume\n"
        "from chunkvol.log import writer\n"
        "names = [record.encode_header_into, record.encode_record_into, record.block_table,\n"
        "         record.decode_header, record.verify_blocks,\n"
        "         group_map.apply_write, group_map.apply_hole, volume.block_table, volume.verify_blocks,\n"
        "         writer.encode_record_into, writer.encode_header_into]\n"
        "reference = [*record.REFERENCE.values(), *group_map.REFERENCE.values()]\n"
        "print(sum(any(n is r for r in reference) for n in names), len(names))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True)
    return [int(word) for word in done.stdout.split()]


def test_chunkvol_pure_selects_the_python_functions():
    python, total = names_in_a_fresh_process(pure=True)
    assert python == total


@needs_fast
def test_without_chunkvol_pure_the_c_functions_serve():
    python, _ = names_in_a_fresh_process(pure=False)
    assert python == 0


@needs_fast
def test_xxh3_is_the_same_as_pythons():
    """Debian's xxhash.h against the xxhash package, on lengths through every XXH3 path
    (0, 1-3, 4-8, 9-16, 17-128, 129-240, longer, several stripes and blocks)."""
    buffer = bytearray(HEADER_SIZE)
    lengths = list(range(0, 300)) + [1023, 1024, 1025, 4096, 65536, 100000]
    for length in lengths:
        payload = data_of(length, length)
        expected = xxhash.xxh3_64_intdigest(payload)
        fast.encode_header_into(buffer, 0, 2, 0, 0, payload, 0, 0, 0, 0, 0)
        assert struct.unpack_from("<Q", buffer, 56)[0] == expected, length
        assert struct.unpack_from("<Q", buffer, 64)[0] == xxhash.xxh3_64_intdigest(bytes(buffer[:64]))
        # Every long-input variant this CPU runs, not only the one picked at import.
        variants = fast.xxh3_variants(payload)
        assert variants[0][0] == "default" and fast.XXH3_VARIANT in [name for name, _ in variants]
        assert all(value == expected for _, value in variants), (length, variants)


def refuse(*args, **kwargs):
    raise AssertionError("the C function fell back to Python")


@needs_fast
def test_the_hot_paths_inputs_never_fall_back_to_python():
    """What the write, read and replay paths pass is done in C (a fallback would be right but
    slow): checked with references that refuse to be called."""
    constants = (record.MAGIC, record.VERSION, HEADER_SIZE, BLOCK_SIZE, GROUP_BLOCKS, record.CHECKSUM_BYTES,
                 MAX_PAYLOAD, int(RecordType.EXTENT))
    known = frozenset(int(t) for t in RecordType)

    def setup(record_functions, group_map_functions):
        fast.setup_record(record.RecordHeader, record.CorruptionError, record.FormatError, known, constants,
                          record_functions)
        fast.setup_group_map(group_map.FULL_SLOTS, EMPTY_STATE, group_map_functions)

    setup(dict.fromkeys(PY, refuse), dict.fromkeys(PY_MAP, refuse))
    try:
        buffer = mmap.mmap(-1, 1 << 20)
        request = memoryview(bytearray(data_of(1, 3 * BLOCK_SIZE)))
        piece = request[BLOCK_SIZE:]
        table = fast.block_table(piece)
        size = fast.encode_record_into(buffer, 100, RecordType.EXTENT, record.FLAG_MORE, 1, piece, 2, 3, 4, 0,
                                       len(piece), table)
        fast.encode_record_into(buffer, 100 + size, RecordType.ZERO, 0, 1, b"", 2, 3, 4, 0, 8192, b"")
        fast.encode_header_into(buffer, 100 + size + HEADER_SIZE, RecordType.SEAL, 0, 0, b"", 2, 3, 4, 0, 0)
        view = memoryview(buffer)
        header = fast.decode_header(view[100:100 + HEADER_SIZE], "chunk", 100)
        assert type(header) is record.RecordHeader
        fast.decode_header(bytes(buffer[100:100 + HEADER_SIZE]))
        blocks_at = 100 + HEADER_SIZE + 16
        fast.verify_blocks(header, view[100 + HEADER_SIZE:blocks_at], view[blocks_at + BLOCK_SIZE:], 1, 1)
        fast.verify_blocks(tuple(header), bytes(table), bytes(piece), 0, 2, "chunk", 100)
        with pytest.raises(record.CorruptionError):
            fast.verify_blocks(header, table, bytes(2 * BLOCK_SIZE), 0, 2)
        with pytest.raises(record.CorruptionError):
            fast.decode_header(bytes(HEADER_SIZE))
        ref = (1 << 40, 4104, 5 << 16, 0)
        state = fast.apply_write(None, 3, 2, ref)
        state = fast.apply_write(state, 4, 4, (2 << 40, 4104, 6 << 16, 0))
        state = fast.apply_write(state, 0, 8, BlockRef(ref))  # renumbers
        state = fast.apply_hole(state, 1, 2)
        fast.apply_write(state, 0, GROUP_BLOCKS, ref)
        fast.apply_hole(None, 1, 2)
        raw_key = group_map.key(1, 2, 3, 4)
        fast.decode_state(fast.encode_state(state, raw_key), raw_key)  # a checkpoint, a map lookup
        fast.decode_state(fast.encode_state(group_map.EMPTY_STATE, raw_key), raw_key)
    finally:
        setup(PY, PY_MAP)  # as record.py and group_map.py set it up


# ---- group_map: apply_write, apply_hole -------------------------------------------------

REF_POOL = [(4096 * i, 4104 * (i % 3 + 1), 1000 + i, i % 2) for i in range(6)]


@st.composite
def refs(draw):
    """A ref from a small pool (so that equal refs recur), as a plain tuple, a BlockRef or an
    equal copy (another object)."""
    base = draw(st.sampled_from(REF_POOL))
    kind = draw(st.sampled_from(["same", "copy", "blockref"]))
    if kind == "copy":
        return tuple(list(base))
    if kind == "blockref":
        return BlockRef(base)
    return base


@st.composite
def hand_built_states(draw):
    """Valid states that writes alone do not make: unused refs, equal refs twice, any order."""
    ref_list = draw(st.lists(refs(), min_size=0, max_size=GROUP_BLOCKS))
    slots = bytearray()
    for _ in range(GROUP_BLOCKS):
        if not ref_list or draw(st.booleans()) and draw(st.booleans()):
            slots.append(HOLE)
        else:
            slots.append(draw(st.integers(0, len(ref_list) - 1)) << 4 | draw(st.integers(0, 15)))
    return bytes(slots), tuple(ref_list)


@st.composite
def odd_states(draw):
    """Any 16 slot bytes (record indexes past the refs too) and refs: Python raises or not."""
    slots = bytes(draw(st.lists(st.integers(0, 255), min_size=GROUP_BLOCKS, max_size=GROUP_BLOCKS)))
    return slots, tuple(draw(st.lists(refs(), max_size=GROUP_BLOCKS + 2)))


ranges = st.integers(0, GROUP_BLOCKS - 1).flatmap(
    lambda first: st.tuples(st.just(first), st.integers(1, GROUP_BLOCKS - first)))
operations = st.one_of(
    st.tuples(st.just("write"), ranges, refs()),
    st.tuples(st.just("hole"), ranges, st.none()))


def same_state(c_result, py_result):
    """Equal, and built of the same objects where Python keeps them (refs are identities)."""
    assert type(c_result) is tuple and type(py_result) is tuple
    assert c_result == py_result
    c_slots, c_refs = c_result
    py_slots, py_refs = py_result
    assert type(c_slots) is bytes and type(c_refs) is tuple
    assert [id(ref) for ref in c_refs] == [id(ref) for ref in py_refs]


def apply_both(operation, state):
    kind, (first, count), ref = operation
    if kind == "write":
        c_result, py_result = fast.apply_write(state, first, count, ref), PY_MAP["apply_write"](state, first, count, ref)
    else:
        c_result, py_result = fast.apply_hole(state, first, count), PY_MAP["apply_hole"](state, first, count)
    same_state(c_result, py_result)
    return py_result


@needs_fast
@settings(max_examples=400, deadline=None)
@given(st.sampled_from([None, EMPTY_STATE]), st.lists(operations, max_size=40))
def test_streams_of_writes_and_holes(start, stream):
    state = start
    for operation in stream:
        state = apply_both(operation, state)


@needs_fast
@settings(max_examples=400, deadline=None)
@given(hand_built_states(), st.lists(operations, min_size=1, max_size=8))
def test_writes_and_holes_on_hand_built_states(state, stream):
    for operation in stream:
        state = apply_both(operation, state)


@needs_fast
@settings(max_examples=400, deadline=None)
@given(st.one_of(odd_states(), hand_built_states(), st.none()), st.integers(-3, 19), st.integers(-3, 19), refs(),
       st.booleans())
def test_any_range_and_any_slots_give_the_same_result_or_exception(state, first, count, ref, hole):
    if hole:
        c, py = outcome(fast.apply_hole, state, first, count), outcome(PY_MAP["apply_hole"], state, first, count)
    else:
        c = outcome(fast.apply_write, state, first, count, ref)
        py = outcome(PY_MAP["apply_write"], state, first, count, ref)
    assert c == py
    if c[0] == "returned":
        same_state(c[1], py[1])


@needs_fast
def test_odd_arguments_give_pythons_answer():
    state = (bytes(range(16)), (REF_POOL[0],))
    cases = [
        ((state, 2, 3, [1, 2]), "write"),  # an unhashable ref: kept in place, no hashing
        (((bytes([0] * 8 + [0x10] * 8), ((1,), [2])), 0, 8, [3]), "write"),  # renumbering hashes it
        (((bytes([0] * 8 + [0x10] * 8), ((1,), [2])), 0, 8), "hole"),
        ((state, 2, 3, None), "write"),  # None as the ref: a hole
        ((state, 0, 16, None), "write"),
        ((state, False, 16, REF_POOL[1]), "write"),
        ((state, True, 3, REF_POOL[1]), "write"),
        ((state, 2.0, 3, REF_POOL[1]), "write"),
        ((state, 1 << 70, 3, REF_POOL[1]), "write"),
        ((state, 0, 1 << 70, REF_POOL[1]), "write"),
        ((list(state), 2, 3, REF_POOL[1]), "write"),
        (((bytearray(state[0]), state[1]), 2, 3, REF_POOL[1]), "write"),
        (((state[0][:8], state[1]), 2, 3, REF_POOL[1]), "write"),
        (((state[0], list(state[1])), 2, 3, REF_POOL[1]), "write"),
        (((state[0], state[1], 1), 2, 3, REF_POOL[1]), "write"),
        (("garbage", 0, 16, REF_POOL[1]), "write"),
        (("garbage", 0, 16), "hole"),
        (("garbage", 1, 2), "hole"),
        ((None, 1, 2), "hole"),
        ((state, 1), "hole"),
        ((state, 1, 2, 3, 4), "write"),
    ]
    sixteen = (bytes(index << 4 | 15 - index for index in range(GROUP_BLOCKS)),
               tuple((index, 0, 0, 0) for index in range(GROUP_BLOCKS)))  # every ref used, none free
    for first in (0, 3, 15, 16):
        for count in (0, 1):
            cases += [((sixteen, first, count, REF_POOL[1]), "write"), ((sixteen, first, count, (3, 0, 0, 0)), "write"),
                      ((sixteen, first, count), "hole")]
    for args, kind in cases:
        name = "apply_write" if kind == "write" else "apply_hole"
        c, py = outcome(getattr(fast, name), *args), outcome(PY_MAP[name], *args)
        assert c == py, args
        if c[0] == "returned" and type(c[1]) is tuple and type(py[1]) is tuple:
            assert [id(ref) for ref in c[1][1]] == [id(ref) for ref in py[1][1]]
    assert outcome(fast.apply_write, state, 1, 2, ref=REF_POOL[1]) == outcome(PY_MAP["apply_write"], state, 1, 2,
                                                                               ref=REF_POOL[1])


# ---- group_map: encode_state, decode_state (the LMDB values) ----------------------------

_bits = {bits: st.integers(0, (1 << bits) - 1) for bits in (16, 32, 64)}
wide_refs = st.tuples(_bits[64], _bits[32], _bits[64], _bits[16])
keys = st.tuples(_bits[32], _bits[64], _bits[64], _bits[32]).map(lambda fields: group_map.key(*fields))


@st.composite
def stored_states(draw):
    """Any valid state, with refs anywhere in their fields' ranges, plain or BlockRef."""
    ref_list = draw(st.lists(st.one_of(wide_refs, wide_refs.map(BlockRef), refs()), max_size=GROUP_BLOCKS))
    slots = bytes(draw(st.lists(st.integers(0, 255), min_size=GROUP_BLOCKS, max_size=GROUP_BLOCKS)))
    return slots, tuple(ref_list)


def same_decoded(c_result, py_result):
    assert c_result == py_result
    if c_result[0] == "returned":
        c_slots, c_refs = c_result[1]
        assert type(c_slots) is bytes and type(c_refs) is tuple
        assert all(type(ref) is tuple and all(type(field) is int for field in ref) for ref in c_refs)


@needs_fast
@settings(max_examples=400, deadline=None)
@given(stored_states(), keys, st.integers(0, 2**32), st.sampled_from(["none", "flip", "cut", "grow", "count", "key"]))
def test_encode_and_decode_state(state, raw_key, seed, mutation):
    raw = fast.encode_state(state, raw_key)
    assert type(raw) is bytes and raw == PY_MAP["encode_state"](state, raw_key)
    rng = random.Random(seed)
    if mutation == "flip":
        position = rng.randrange(len(raw))
        raw = raw[:position] + bytes([raw[position] ^ 1 << rng.randrange(8)]) + raw[position + 1:]
    elif mutation == "cut":
        raw = raw[:rng.randrange(len(raw))]
    elif mutation == "grow":
        raw += data_of(seed, rng.randrange(1, 30))
    elif mutation == "count":
        raw = bytes([rng.randrange(256)]) + raw[1:]
    elif mutation == "key":
        raw_key = group_map.key(rng.randrange(4), rng.randrange(4), rng.randrange(4), rng.randrange(4))
    c, py = outcome(fast.decode_state, raw, raw_key), outcome(PY_MAP["decode_state"], raw, raw_key)
    same_decoded(c, py)
    if mutation == "none":
        assert c[1] == (state[0], tuple(tuple(ref) for ref in state[1]))


@needs_fast
def test_odd_state_arguments_give_pythons_answer():
    raw_key = group_map.key(1, 2, 3, 4)
    state = (bytes(range(16)), (REF_POOL[0], BlockRef(REF_POOL[1])))
    raw = PY_MAP["encode_state"](state, raw_key)
    encode_cases = [
        (state, raw_key), (list(state), raw_key), ((state[0], list(state[1])), raw_key),
        ((bytearray(state[0]), state[1]), raw_key), ((state[0][:8], state[1]), raw_key),
        ((state[0] + b"x", state[1]), raw_key), (("slots" * 4, state[1]), raw_key),
        ((state[0], state[1], 1), raw_key), ((state[0], (REF_POOL[0],) * 17), raw_key),
        ((state[0], ((1, 2, 3),)), raw_key), ((state[0], ((1, 2, 3, 4, 5),)), raw_key),
        ((state[0], ([1, 2, 3, 4],)), raw_key), ((state[0], ((-1, 2, 3, 4),)), raw_key),
        ((state[0], ((1 << 64, 2, 3, 4),)), raw_key), ((state[0], ((1, 1 << 32, 3, 4),)), raw_key),
        ((state[0], ((1, 2, 3, 1 << 16),)), raw_key), ((state[0], ((1, 2.0, 3, 4),)), raw_key),
        ((state[0], ((True, 2, 3, 4),)), raw_key), ((state[0], ((1, 2, 3, None),)), raw_key),
        (state, bytearray(raw_key)), (state, memoryview(raw_key)), (state, raw_key * 4), (state, "key"),
        (None, raw_key), (EMPTY_STATE, b""),
    ]
    for args in encode_cases:
        assert outcome(fast.encode_state, *args) == outcome(PY_MAP["encode_state"], *args), args
    decode_cases = [
        (raw, raw_key), (bytearray(raw), raw_key), (memoryview(raw), raw_key), (raw, bytearray(raw_key)),
        (raw, raw_key * 4), (raw[:21], raw_key), (b"", raw_key), (raw + b"\0" * 22, raw_key), ("raw", raw_key),
        (raw, None),
    ]
    def forged(value):  # a value of the wrong shape under a checksum that matches it
        unsigned = value[:2] + bytes(4) + value[6:]
        return value[:2] + struct.pack("<I", xxhash.xxh3_64_intdigest(raw_key + unsigned) & 0xFFFFFFFF) + value[6:]
    decode_cases += [(forged(raw + bytes(22)), raw_key), (forged(raw[:-22]), raw_key), (forged(raw + bytes(1)), raw_key),
                     (forged(bytes([17]) + raw[1:] + bytes(22 * 15)), raw_key), (forged(raw), raw_key)]
    for args in decode_cases:
        same_decoded(outcome(fast.decode_state, *args), outcome(PY_MAP["decode_state"], *args))
    assert outcome(fast.encode_state, state, raw_key=raw_key) == outcome(PY_MAP["encode_state"], state, raw_key=raw_key)
    assert outcome(fast.decode_state, raw) == outcome(PY_MAP["decode_state"], raw)


# ---- record: encode_header_into, encode_record_into ------------------------------------

u8, u16, u32, u64 = (st.integers(0, (1 << bits) - 1) for bits in (8, 16, 32, 64))
header_fields = st.tuples(u8, u16, u32, u64, u64, u64, u64, u64)  # type, flags, volume, node .. length


def as_kind(data, kind):
    if kind == "bytes":
        return bytes(data)
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(bytes(data))
    return memoryview(b"\x01" * 3 + bytes(data) + b"\x02")[3:3 + len(data)]  # a slice of a larger buffer


buffer_kinds = st.sampled_from(["bytearray", "mmap", "memoryview"])
data_kinds = st.sampled_from(["bytes", "bytearray", "memoryview", "slice"])


def make_buffer(kind, size, seed):
    content = data_of(seed, size)
    if kind == "mmap":
        buffer = mmap.mmap(-1, max(size, 1))
        buffer[:size] = content
        return buffer
    if kind == "memoryview":
        return memoryview(bytearray(content))
    return bytearray(content)


def contents(buffer):
    return bytes(buffer)


@needs_fast
@settings(max_examples=300, deadline=None)
@given(header_fields, st.integers(0, 9000), st.one_of(st.none(), st.integers(0, 17).map(lambda n: n * 8)),
       data_kinds, buffer_kinds, st.integers(0, 300), st.integers(-100, 100), st.integers(0, 2**32))
def test_encode_header_into(fields, payload_length, table_length, kind, buffer_kind, position, slack, seed):
    payload = as_kind(data_of(seed, payload_length), kind)
    table = None if table_length is None else as_kind(data_of(seed + 1, table_length), kind)
    size = max(0, position + HEADER_SIZE + slack)
    results = []
    for function in (fast.encode_header_into, PY["encode_header_into"]):
        buffer = make_buffer(buffer_kind, size, seed)
        results.append((outcome(function, buffer, position, *fields[:3], payload, *fields[3:], table=table),
                        contents(buffer)))
    assert results[0] == results[1]


@needs_fast
@settings(max_examples=300, deadline=None)
@given(header_fields, st.integers(0, 9000), st.integers(0, 17).map(lambda n: n * 8), data_kinds, buffer_kinds,
       st.integers(0, 300), st.integers(-100, 100), st.integers(0, 2**32))
def test_encode_record_into(fields, payload_length, table_length, kind, buffer_kind, position, slack, seed):
    payload = as_kind(data_of(seed, payload_length), kind)
    table = as_kind(data_of(seed + 1, table_length), kind)
    size = max(0, position + HEADER_SIZE + table_length + payload_length + slack)
    results = []
    for function in (fast.encode_record_into, PY["encode_record_into"]):
        buffer = make_buffer(buffer_kind, size, seed)
        results.append((outcome(function, buffer, position, *fields[:3], payload, *fields[3:], table),
                        contents(buffer)))
    assert results[0] == results[1]  # a short bytearray grows in both alike


def test_encode_record_into_is_what_the_writer_did():
    """The reference writes what LogWriter.append wrote: header, table, payload."""
    for table in (b"", bytes(range(16))):
        payload = data_of(3, 8192)
        expected = bytearray(HEADER_SIZE + len(table) + len(payload) + 10)
        record.REFERENCE["encode_header_into"](expected, 5, 1, 0, 7, payload, 1, 2, 3, 4, 8192, table=table or None)
        expected[5 + HEADER_SIZE:5 + HEADER_SIZE + len(table)] = table
        expected[5 + HEADER_SIZE + len(table):5 + HEADER_SIZE + len(table) + len(payload)] = payload
        buffer = bytearray(len(expected))
        assert PY["encode_record_into"](buffer, 5, 1, 0, 7, payload, 1, 2, 3, 4, 8192, table) == \
            HEADER_SIZE + len(table) + len(payload)
        assert buffer == expected


OUT_OF_RANGE = [(index, value) for index, bits in enumerate([8, 16, 32, 64, 64, 64, 64, 64])
                for value in (-1, 1 << bits)]


@pytest.mark.parametrize("index,value", OUT_OF_RANGE)
def test_out_of_range_fields_raise_struct_error(index, value):
    """What Python raises is pinned (struct.error, not OverflowError), and C raises the same."""
    fields = [1, 0, 1, 5, 6, 7, 8, 4096]
    fields[index] = value
    functions = [("python", PY["encode_header_into"], PY["encode_record_into"])]
    if fast is not None:
        functions.append(("c", fast.encode_header_into, fast.encode_record_into))
    seen = []
    for _, header_into, record_into in functions:
        for function, extra in ((header_into, ()), (record_into, (b"",))):
            buffer = bytearray(200)
            with pytest.raises(struct.error) as raised:
                function(buffer, 0, *fields[:3], b"abc", *fields[3:], *extra)
            seen.append((str(raised.value), bytes(buffer)))
    assert all(entry == seen[0] for entry in seen)


@needs_fast
def test_odd_encode_arguments_give_pythons_answer():
    payload = b"x" * 10
    good = [0, 1, 0, 1, payload, 1, 2, 3, 4, 10]
    cases = [
        ([bytes(100)] + good, {}),  # read-only buffer
        ([bytearray(100), -10] + good[1:], {}),  # negative position: struct counts from the end
        ([bytearray(100), 0, RecordType.EXTENT, True] + good[2:], {}),  # IntEnum, bool
        ([bytearray(100), 0, 1.0] + good[2:], {}),
        ([bytearray(100), 0] + good[:3] + ["text"] + good[4:], {}),  # str: xxhash takes str
        ([bytearray(100), 0] + good[:3] + [[1, 2]] + good[4:], {}),
        ([bytearray(100), 0] + good[:3] + [memoryview(b"abcdefgh").cast("Q")] + good[4:], {}),
        ([bytearray(100), 0] + good[:3] + [memoryview(b"abcdefgh")[::2]] + good[4:], {}),
        ([bytearray(100), 0] + good[:3] + [b"abc"] + good[4:], {"table": "text"}),
        ([bytearray(100), 0] + good[:3] + [[1, 2, 3]] + good[4:], {"table": b"12345678"}),
        ([memoryview(bytearray(800)).cast("Q"), 1] + good, {}),
        ([bytearray(100)] + good, {"bogus": 1}),
        ([bytearray(100)] + good[:-1], {}),
        ([bytearray(100), 0] + good, {"position": 0}),
        ([], {"buffer": bytearray(100), "position": 3, "record_type": 1, "flags": 0, "volume_id": 1,
              "payload": payload, "origin_node": 1, "origin_sequence": 2, "hlc": 3, "offset_bytes": 4,
              "length_bytes": 10}),
    ]
    for args, kwargs in cases:
        results = []
        for function in (fast.encode_header_into, PY["encode_header_into"]):
            copied = [bytearray(a) if isinstance(a, bytearray) else a for a in args]
            copied_kwargs = {k: bytearray(v) if isinstance(v, bytearray) else v for k, v in kwargs.items()}
            results.append((outcome(function, *copied, **copied_kwargs),
                            [bytes(a) for a in copied[:1] if isinstance(a, (bytearray, memoryview))]))
        assert results[0] == results[1], (args, kwargs)
    closed = mmap.mmap(-1, 100)
    closed.close()
    assert outcome(fast.encode_header_into, closed, 0, *good) == outcome(PY["encode_header_into"], closed, 0, *good)
    for table in ([1, 2], None, "ab", b"abcdefgh"):
        results = []
        for function in (fast.encode_record_into, PY["encode_record_into"]):
            buffer = bytearray(100)
            results.append((outcome(function, buffer, 0, *good, table), bytes(buffer)))
        assert results[0] == results[1], table


# ---- record: block_table, decode_header, verify_blocks ----------------------------------

@needs_fast
@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(0, 17 * BLOCK_SIZE + 100), st.integers(0, 17).map(lambda n: n * BLOCK_SIZE)),
       data_kinds, st.integers(0, 2**32))
def test_block_table(length, kind, seed):
    data = as_kind(data_of(seed, length), kind)
    assert outcome(fast.block_table, data) == outcome(PY["block_table"], data)


@needs_fast
def test_odd_block_table_arguments():
    for data in ("text", None, memoryview(bytes(8192)).cast("Q"), memoryview(bytes(8192))[::2], bytearray(4096)):
        assert outcome(fast.block_table, data) == outcome(PY["block_table"], data)
    assert outcome(fast.block_table, data=b"") == outcome(PY["block_table"], data=b"")
    assert outcome(fast.block_table) == outcome(PY["block_table"])


def header_bytes(fields, payload, table=None):
    out = bytearray(HEADER_SIZE)
    PY["encode_header_into"](out, 0, *fields[:3], payload, *fields[3:], table=table)
    return out


def rechecked(raw):
    """The header with its header checksum made right again."""
    raw = bytearray(raw)
    struct.pack_into("<Q", raw, 64, xxhash.xxh3_64_intdigest(bytes(raw[:64])))
    return raw


mutations = st.one_of(
    st.tuples(st.just("none"), st.just(0)),
    st.tuples(st.just("flip"), st.integers(0, HEADER_SIZE * 8 - 1)),
    st.tuples(st.just("truncate"), st.integers(0, HEADER_SIZE - 1)),
    st.tuples(st.just("magic"), st.integers(0, 3)),
    st.tuples(st.just("version"), st.integers(0, 255)),
    st.tuples(st.just("type"), st.integers(0, 255)),
    st.tuples(st.just("stored_length"), st.sampled_from([MAX_PAYLOAD, MAX_PAYLOAD + 1, (1 << 32) - 1])),
    st.tuples(st.just("longer"), st.integers(1, 100)),
)


def mutated(raw, mutation):
    kind, value = mutation
    raw = bytearray(raw)
    if kind == "flip":
        raw[value // 8] ^= 1 << value % 8
    elif kind == "truncate":
        del raw[value:]
    elif kind == "magic":
        raw[value] ^= 0x20
        if value % 2:
            raw = rechecked(raw)
    elif kind == "version":
        raw[4] = value
        raw = rechecked(raw)
    elif kind == "type":
        raw[5] = value
        raw = rechecked(raw)
    elif kind == "stored_length":
        struct.pack_into("<I", raw, 12, value)
        raw = rechecked(raw)
    elif kind == "longer":
        raw += bytes(value)
    return raw


places = st.one_of(st.tuples(st.none(), st.none()), st.tuples(st.text(max_size=10), st.none()),
                   st.tuples(st.text(max_size=10), st.integers(0, 1 << 50)), st.tuples(st.none(), st.integers()))


@needs_fast
@settings(max_examples=500, deadline=None)
@given(header_fields, st.integers(0, 300), mutations, data_kinds, places, st.booleans(), st.integers(0, 2**32))
def test_decode_header(fields, payload_length, mutation, kind, place, keywords, seed):
    fields = (draw_type(fields[0]),) + fields[1:]
    raw = mutated(header_bytes(fields, data_of(seed, payload_length)), mutation)
    view = as_kind(raw, kind)
    path, offset = place
    if keywords:
        c = outcome(fast.decode_header, view, path=path, offset=offset)
        py = outcome(PY["decode_header"], view, path=path, offset=offset)
    else:
        c, py = outcome(fast.decode_header, view, path, offset), outcome(PY["decode_header"], view, path, offset)
    assert c == py
    if c[0] == "returned":
        assert type(c[1]) is record.RecordHeader
        assert c[1].payload_xxh3 == py[1].payload_xxh3 and c[1].origin_node == py[1].origin_node


def draw_type(value):
    """Mostly known record types, EXTENT often (its payload limit), sometimes any byte."""
    return value if value % 4 == 0 else (value % 14 if value % 4 == 1 else RecordType.EXTENT)


@needs_fast
def test_odd_decode_header_arguments():
    good = header_bytes((1, 0, 1, 5, 6, 7, 8, 4096), b"abc")
    for view in ("text" * 20, None, memoryview(bytes(good) * 8).cast("Q"), memoryview(bytes(good) * 2)[::2],
                 memoryview(bytes(good)).cast("c"), list(good)):
        assert outcome(fast.decode_header, view) == outcome(PY["decode_header"], view), view
    assert outcome(fast.decode_header) == outcome(PY["decode_header"])
    assert outcome(fast.decode_header, good, "p", 1, 2) == outcome(PY["decode_header"], good, "p", 1, 2)
    assert outcome(fast.decode_header, good, paths="p") == outcome(PY["decode_header"], good, paths="p")


@st.composite
def extents(draw):
    """(header, table, blocks, first_block, block_count) of a raw EXTENT read back, some damaged."""
    count = draw(st.integers(0, GROUP_BLOCKS))
    seed = draw(st.integers(0, 2**32))
    data = bytearray(data_of(seed, count * BLOCK_SIZE))
    table = bytearray(PY["block_table"](data))
    checksum = xxhash.xxh3_64_intdigest(bytes(table))
    first = draw(st.integers(0, count))
    block_count = draw(st.integers(0, count - first))
    damage = draw(st.sampled_from(["none", "none", "block", "table", "header", "short", "short_matching", "long",
                                   "range", "table_length", "header_value"]))
    header = [1, 0, 1, count * 4104, 1, 2, 3, 0, count * BLOCK_SIZE, checksum]
    blocks = data[first * BLOCK_SIZE:(first + block_count) * BLOCK_SIZE]
    if damage == "block" and blocks:
        blocks[draw(st.integers(0, len(blocks) - 1))] ^= 4
    elif damage == "table" and table:
        table[draw(st.integers(0, len(table) - 1))] ^= 4
    elif damage == "header":
        header[9] ^= 1 << draw(st.integers(0, 63))
    elif damage == "short":
        del blocks[draw(st.integers(0, len(blocks))):]
    elif damage == "short_matching":  # cut short, with a table that matches the partial last block
        del blocks[draw(st.integers(0, len(blocks))):]
        for index in range(block_count):
            piece = bytes(blocks[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE])
            struct.pack_into("<Q", table, (first + index) * 8, xxhash.xxh3_64_intdigest(piece))
        header[9] = xxhash.xxh3_64_intdigest(bytes(table))
    elif damage == "long":
        blocks += bytes(draw(st.integers(1, 5000)))
    elif damage == "range":
        first, block_count = draw(st.integers(-2, 20)), draw(st.integers(-2, 20))
    elif damage == "table_length":
        table += bytes(draw(st.sampled_from([1, 7, 8, 8 * 17])))
        header[9] = xxhash.xxh3_64_intdigest(bytes(table))
    elif damage == "header_value":
        header[9] = draw(st.sampled_from([-1, 1 << 64, 1 << 70, "x", None, float(checksum)]))
    return header, bytes(table), bytes(blocks), first, block_count


@needs_fast
@settings(max_examples=400, deadline=None)
@given(extents(), st.sampled_from(["tuple", "RecordHeader", "list"]), data_kinds, places)
def test_verify_blocks(extent, header_kind, kind, place):
    header, table, blocks, first, count = extent
    header = {"tuple": tuple, "RecordHeader": record.RecordHeader, "list": list}[header_kind](header)
    args = (header, as_kind(table, kind), as_kind(blocks, kind), first, count, *place)
    assert outcome(fast.verify_blocks, *args) == outcome(PY["verify_blocks"], *args)


@needs_fast
def test_odd_verify_blocks_arguments():
    data = data_of(1, 2 * BLOCK_SIZE)
    table = PY["block_table"](data)
    header = (1, 0, 1, 2 * 4104, 1, 2, 3, 0, 2 * BLOCK_SIZE, xxhash.xxh3_64_intdigest(table))
    cases = [
        ((header, table, data, 0, 2), {}),
        ((header, table, data, 0, 2), {"path": "p", "offset": 9}),
        ((header, table, data), {"first_block": 1, "block_count": 1}),
        ((header, table, data, True, 1), {}),
        ((header, table, data, 0, 2.0), {}),
        ((header[:9], table, data, 0, 2), {}),
        ((header, "text", data, 0, 2), {}),
        ((header, table, "text", 0, 2), {}),
        ((header, table, memoryview(data).cast("Q"), 0, 2), {}),
        ((header, table, memoryview(data + data)[::2], 0, 2), {}),
        ((header, table, data, 0, 1 << 70), {}),
        ((header, table, data, 0), {}),
        ((header, table, data, 0, 2), {"bogus": 1}),
    ]
    # blocks cut short inside block 1, with a table made of what Python hashes: the partial block
    partial = bytearray(table)
    struct.pack_into("<Q", partial, 8, xxhash.xxh3_64_intdigest(data[BLOCK_SIZE:5000]))
    partial_header = header[:9] + (xxhash.xxh3_64_intdigest(bytes(partial)),)
    cases.append(((partial_header, bytes(partial), data[:5000], 0, 2), {}))
    for args, kwargs in cases:
        assert outcome(fast.verify_blocks, *args, **kwargs) == outcome(PY["verify_blocks"], *args, **kwargs), args
    assert fast.verify_blocks(partial_header, bytes(partial), data[:5000], 0, 2) is None


@needs_fast
@settings(max_examples=100, deadline=None)
@given(header_fields, st.integers(0, GROUP_BLOCKS), st.integers(0, 2**32))
def test_a_record_written_by_c_reads_back_in_python(fields, count, seed):
    """Round trip across the two: C writes, the reference decodes and verifies, and back."""
    data = data_of(seed, count * BLOCK_SIZE)
    table = fast.block_table(data)
    fields = (RecordType.EXTENT, fields[1] & ~record.FLAG_ZSTD) + fields[2:7] + (count * BLOCK_SIZE,)  # raw
    buffer = bytearray(HEADER_SIZE + len(table) + len(data))
    size = fast.encode_record_into(buffer, 0, *fields[:3], data, *fields[3:], table)
    assert size == len(buffer)
    for decode, verify in ((PY["decode_header"], PY["verify_blocks"]), (fast.decode_header, fast.verify_blocks)):
        header = decode(memoryview(buffer)[:HEADER_SIZE])
        assert header[3] == len(table) + len(data) and header[0] == RecordType.EXTENT
        verify(header, bytes(buffer[HEADER_SIZE:HEADER_SIZE + len(table)]), memoryview(buffer)[HEADER_SIZE + len(table):],
               0, count)
    assume(count)
    record.verify_payload(PY["decode_header"](buffer), memoryview(buffer)[HEADER_SIZE:])
