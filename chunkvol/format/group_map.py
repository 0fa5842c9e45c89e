"""Block-map group versions: the values (and keys) of the LMDB `groups` database.

A volume is cut into map groups of 16 blocks (64 KiB). Every version of a group is one LMDB
entry, so the live state and every past flush point are one seek away:

Key, big-endian so that LMDB's byte order is numeric order (24 bytes):

| offset | size | type | field        | meaning                                         |
|-------:|-----:|------|--------------|-------------------------------------------------|
|      0 |    4 | u32  | volume_id    |                                                 |
|      4 |    8 | u64  | group        | block // 16                                     |
|     12 |    8 | u64  | ~hlc         | 2^64-1 - stamp time: newest version sorts first |
|     20 |    4 | u32  | ~node        | 2^32-1 - stamp node                             |

Value, little-endian (22 + 22 * record_count bytes):

| offset | size | type     | field        | meaning                                                |
|-------:|-----:|----------|--------------|--------------------------------------------------------|
|      0 |    1 | u8       | record_count | distinct records the group's blocks live in (0..16)    |
|      1 |    1 | u8       | reserved     | 0                                                      |
|      2 |    4 | u32      | checksum     | low 32 bits of xxh3-64 of key + value with this field 0 |
|      6 |   16 | u8[16]   | slots        | per block: 0xFF hole, else record_index << 4 | block_in_record |
|     22 | 22*n | refs     | records      | address u64, stored_length u32, hlc u64, flags u16     |

LMDB keeps no checksums of its own; the value's checksum covers its key too, so a flipped bit
in a value, or a value found under another key, is detected instead of read as a mapping.

A group state in memory is the tuple (slots: bytes of 16, refs: tuple of ref tuples); a ref
is (address, stored_length, hlc, flags) as in the value above (BlockRef names the fields).
The reader checks a record's header (volume, offset, hlc) against the ref before use, so a
stale or misdirected map entry is detected, never returned as data.
"""

import os
import struct
from itertools import chain
from operator import itemgetter

import xxhash

from chunkvol.errors import CorruptionError
from chunkvol.format.record import GROUP_BLOCKS

KEY = struct.Struct(">IQQI")
VALUE_HEAD = struct.Struct("<BBI16s")
REF = struct.Struct("<QIQH")
assert KEY.size == 24 and VALUE_HEAD.size == 22 and REF.size == 22
_REFS = [struct.Struct("<" + "QIQH" * count) for count in range(GROUP_BLOCKS + 1)]
_ZERO_CHECKSUM = bytes(4)
_xxh3 = xxhash.xxh3_64_intdigest

HOLE = 0xFF
HOLE_SLOTS = bytes([HOLE]) * GROUP_BLOCKS
EMPTY_STATE = (HOLE_SLOTS, ())
FULL_SLOTS = bytes(range(GROUP_BLOCKS))  # record 0, blocks 0..15
MAX_U64 = (1 << 64) - 1
MAX_U32 = (1 << 32) - 1


class BlockRef(tuple):
    """A ref: where the record holding some of a group's blocks lives, in REF order. flags is
    the record's FLAG_ZSTD bit only. The per-request code (decode_state, the write path, the
    functions below) builds and reads refs as plain tuples, which cost less; so code that
    may get any ref unpacks it (`address, stored_length, hlc, flags = ref`), and a ref built
    off that path is a BlockRef, read by name. Equal to, and hashing as, the plain tuple."""

    __slots__ = ()
    address = property(itemgetter(0))        # log address of the record's header
    stored_length = property(itemgetter(1))  # its payload bytes on disk (the header's stored_length)
    hlc = property(itemgetter(2))            # its stamp (the header's hlc)
    flags = property(itemgetter(3))          # FLAG_ZSTD or 0


def key(volume_id, group, hlc, node):
    return KEY.pack(volume_id, group, MAX_U64 - hlc, MAX_U32 - node)


def newest_key(volume_id, group):
    """The smallest key of a group: set_range() on it lands on the newest version."""
    return KEY.pack(volume_id, group, 0, 0)


def decode_key(raw):
    volume_id, group, inverted_hlc, inverted_node = KEY.unpack(raw)
    return volume_id, group, MAX_U64 - inverted_hlc, MAX_U32 - inverted_node


def encode_state(state, raw_key):
    slots, refs = state
    if not refs:
        body = b""
    elif len(refs) == 1:
        body = REF.pack(*refs[0])
    else:
        body = _REFS[len(refs)].pack(*chain.from_iterable(refs))
    unsigned = VALUE_HEAD.pack(len(refs), 0, 0, slots) + body
    checksum = _xxh3(raw_key + unsigned) & 0xFFFFFFFF
    return VALUE_HEAD.pack(len(refs), 0, checksum, slots) + body


def decode_state(raw, raw_key):
    if len(raw) < VALUE_HEAD.size:
        raise CorruptionError("block map group value too short; `chunkvol check --repair` rebuilds the map")
    count, _, checksum, slots = VALUE_HEAD.unpack_from(raw)
    if count > GROUP_BLOCKS or len(raw) != VALUE_HEAD.size + count * REF.size:
        raise CorruptionError("block map group value has a bad length; `chunkvol check --repair` rebuilds the map")
    if _xxh3(raw_key + raw[:2] + _ZERO_CHECKSUM + raw[6:]) & 0xFFFFFFFF != checksum:
        raise CorruptionError("block map group value fails its checksum; `chunkvol check --repair` rebuilds the map")
    if count == 1:
        return slots, (REF.unpack_from(raw, VALUE_HEAD.size),)
    flat = _REFS[count].unpack_from(raw, VALUE_HEAD.size)
    return slots, tuple(zip(flat[0::4], flat[1::4], flat[2::4], flat[3::4]))


def is_hole(state):
    return state[0] == HOLE_SLOTS


def apply_write(state, first_block, block_count, ref):
    """The state after blocks [first_block, first_block+block_count) of the group now live in
    `ref` (whose block 0 is first_block). Keeps only refs that some slot still uses."""
    if first_block == 0 and block_count == GROUP_BLOCKS:
        return FULL_SLOTS, (ref,)
    slots, refs = state if state is not None else EMPTY_STATE
    return _rebuild(slots, refs, first_block, block_count, ref)


def apply_hole(state, first_block, block_count):
    """The state after blocks [first_block, first_block+block_count) were zeroed or trimmed."""
    if state is None or (first_block == 0 and block_count == GROUP_BLOCKS):
        return EMPTY_STATE
    slots, refs = state
    return _rebuild(slots, refs, first_block, block_count, None)


def _slot_run(record_index, block_count):
    return bytes((record_index << 4) | block for block in range(block_count))


_SLOT_RUNS = [[_slot_run(index, count) for count in range(GROUP_BLOCKS + 1)] for index in range(GROUP_BLOCKS)]
_HOLE_RUNS = [bytes([HOLE]) * count for count in range(GROUP_BLOCKS + 1)]


def _rebuild(slots, refs, first_block, block_count, new_ref):
    """Replace a run of slots; keep refs in place when every old one is still used (the
    common case, done with bytes operations), else renumber them (the general loop)."""
    end = first_block + block_count
    outside = set(slots[:first_block]) | set(slots[end:])
    outside.discard(HOLE)
    if len({slot >> 4 for slot in outside}) == len(refs) and (new_ref is None or len(refs) < GROUP_BLOCKS):
        if new_ref is None:
            return slots[:first_block] + _HOLE_RUNS[block_count] + slots[end:], refs
        run = _SLOT_RUNS[len(refs)][block_count]
        return slots[:first_block] + run + slots[end:], refs + (new_ref,)
    return _renumber(slots, refs, first_block, block_count, new_ref)


def _renumber(slots, refs, first_block, block_count, new_ref):
    old = list(slots)
    end = first_block + block_count
    new_refs = []
    remap = {}
    out = bytearray(GROUP_BLOCKS)
    for block in range(GROUP_BLOCKS):
        if first_block <= block < end:
            if new_ref is None:
                out[block] = HOLE
                continue
            if new_ref not in remap:
                remap[new_ref] = len(new_refs)
                new_refs.append(new_ref)
            out[block] = (remap[new_ref] << 4) | (block - first_block)
            continue
        slot = old[block]
        if slot == HOLE:
            out[block] = HOLE
            continue
        ref = refs[slot >> 4]
        if ref not in remap:
            remap[ref] = len(new_refs)
            new_refs.append(ref)
        out[block] = (remap[ref] << 4) | (slot & 0x0F)
    return bytes(out), tuple(new_refs)


# ---- last writer wins (records of other nodes, mirror/receiver.py and replay) -------------

def block_stamps(state, floors=None):
    """Per block of a group, the stamp of what it holds now: its record's, or for a hole the
    greatest stamp of a ZERO over it (`floors`, from index/tombstones.py), 0 if never written."""
    if state is None:
        return list(floors) if floors else [0] * GROUP_BLOCKS
    slots, refs = state
    stamps = [0 if slot == HOLE else refs[slot >> 4][2] for slot in slots]
    if floors:
        stamps = [max(pair) for pair in zip(stamps, floors)]
    return stamps


def merge(state, first_block, block_count, ref, stamp, floors=None):
    """(new state, stamps before, data stamps before) after a record stamped `stamp` covers
    blocks [first, first+count): data of `ref` (its block 0 is first_block) or, with ref None,
    a hole. Each block takes it only where `stamp` is greater than what the block holds (last
    writer wins); the same record again changes nothing. A block whose stamp before is greater
    than its data stamp was last a hole (a ZERO's tombstone)."""
    held = block_stamps(state)
    before = [max(pair) for pair in zip(held, floors)] if floors else held
    end = first_block + block_count
    # A tombstone of this very ZERO (stamp equal) does not stop it: stamps are unique.
    wins = [block for block in range(first_block, end)
            if stamp > held[block] and (not floors or stamp >= floors[block])]
    if not wins:
        return state, before, held
    if len(wins) == block_count:
        if ref is None:
            return apply_hole(state, first_block, block_count), before, held
        return apply_write(state, first_block, block_count, ref), before, held
    blocks = to_blocks(state)
    for block in wins:
        blocks[block] = None if ref is None else (ref, block - first_block)
    return from_blocks(blocks), before, held


def to_blocks(state):
    """A state as 16 entries of (ref, block within its record) or None (a hole)."""
    if state is None:
        return [None] * GROUP_BLOCKS
    slots, refs = state
    return [None if slot == HOLE else (refs[slot >> 4], slot & 0x0F) for slot in slots]


def from_blocks(blocks):
    """A state from a per-block list of (ref, block within its record) or None (a hole)."""
    remap = {}
    refs = []
    out = bytearray(GROUP_BLOCKS)
    for block, entry in enumerate(blocks):
        if entry is None:
            out[block] = HOLE
            continue
        ref, within = entry
        if ref not in remap:
            remap[ref] = len(refs)
            refs.append(ref)
        out[block] = (remap[ref] << 4) | within
    return bytes(out), tuple(refs)


def enforce_holes(state, floors):
    """The state with every block whose tombstone (`floors`) is newer than its data made a hole."""
    if state is None or not floors:
        return state
    blocks = to_blocks(state)
    changed = False
    for block, entry in enumerate(blocks):
        if entry is not None and floors[block] > entry[0][2]:
            blocks[block] = None
            changed = True
    return from_blocks(blocks) if changed else state


# ---- the compiled versions (format/fast.c) ----------------------------------------------
# apply_write and apply_hole above (with _rebuild and _renumber), encode_state and
# decode_state are the reference, kept and tested against the C ones
# (tests/format/test_fast.py), which serve when the extension is built (make install) and
# CHUNKVOL_PURE is not 1.
REFERENCE = {"apply_write": apply_write, "apply_hole": apply_hole, "encode_state": encode_state,
             "decode_state": decode_state}
try:
    from chunkvol.format import fast
except ImportError:  # not built: the reference serves
    fast = None
if fast is not None:
    fast.setup_group_map(FULL_SLOTS, EMPTY_STATE, REFERENCE)
    if os.environ.get("CHUNKVOL_PURE") != "1":
        apply_write = fast.apply_write
        apply_hole = fast.apply_hole
        encode_state = fast.encode_state
        decode_state = fast.decode_state
