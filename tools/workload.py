#!/usr/bin/env python3
"""A seeded block workload and a crash oracle for chunkvol (or any NBD export).

Operation i of a workload is a pure function of (seed, i): its kind (write, FUA write, big
write, zero, trim, flush), offset and length (aligned or not, one or many 64 KiB groups), and
every byte it writes. So a run is recorded by op indices alone and can be recomputed.

A `History` records what the server said: ops are issued ("I i"), acknowledged ("A i"), or
failed while the server went on ("F i": effect unknown, block by block, as NBD allows for a
failed write); after a crash the oracle says which prefix survived ("R n [i blocks...]").
With a journal path every event is appended to a text file, and each acknowledgement is
fsynced before the next op is issued (`run`), or in groups (`run_pipelined`), so the journal
survives the server's death and, for `run`, the workload's own.

`Oracle.verify(history, read)` reads the volume back after a restart and checks:
  (a) durability: every op acknowledged before the last acknowledged flush point (a FLUSH,
      or a FUA write/zero/trim: chunkvol's guarantee 1) is there;
  (b) prefix consistency: the content is the state after some prefix of the acknowledged
      ops followed by the in-flight ones (in issue order), no shorter than the last flush
      point. The search starts at the flush point and applies one op at a time, tracking
      only the blocks the ops after it touch: O(blocks touched), not O(ops x volume); the
      image at the flush point is kept between calls.
atomicity="request" (the default) demands whole requests; "block" lets the op at the cut be
partly applied, each 4 KiB block old or new (what a disk gives). Each 512-byte sector a write
puts down starts with a tag (seed, op index, sector), so a mismatch report says which op
wrote the bytes found. The volume must read as zeros in the span when a journal starts.

By hand, against a running server (journal default: ./workload-<seed>.journal):

    .venv/bin/python tools/workload.py --socket S --export disk0 --seed 1 --ops 500 [--wipe]

then kill -9 the server, restart it, and run the same command again: it verifies the volume
against the journal first (exit 1 on a violation, 2 if it cannot read), records the prefix it
found, then goes on. --verify-only: verify and stop. One JSON line is printed per run.
"""

import argparse
import collections
import json
import os
import random
import struct
import sys
import time
from typing import NamedTuple

BLOCK = 4096
SECTOR = 512
ZERO_BLOCK = bytes(BLOCK)
TAG = struct.Struct("<4sQQI")  # magic, seed, op index, sector number within the op
TAG_MAGIC = b"CVwl"
JOURNAL_MAGIC = "chunkvol-workload 1"
DEFAULT_WEIGHTS = {"write": 60, "fua": 5, "big": 3, "zero": 8, "trim": 7, "flush": 10}
MiB = 1 << 20
DATA_CACHE_BYTES = 64 * MiB


class Params(NamedTuple):
    """What a workload does; everything but the seed. JSON-able (the journal keeps it)."""
    volume_size: int
    span: int = 0                 # ops stay in [0, span); 0: min(volume, 16 MiB)
    max_write: int = 256 << 10    # ordinary writes: up to this many bytes (multi-group)
    big_write: int = 2 << 20      # "big" writes: up to this (cross the log writer's buffer)
    max_zero: int = 512 << 10
    unaligned: float = 0.3        # share of ops with an unaligned offset or length
    compressible: float = 0.4     # share of writes whose filler is a repeated byte
    weights: tuple = tuple(sorted(DEFAULT_WEIGHTS.items()))
    pattern: str = "random"       # "random", or "stride": 4 KiB writes, one per 64 KiB group
    flush_every: int = 0          # "stride": a flush every this many ops (0: never)
    trim_zeroes: bool = True      # a trimmed range reads back as zeros (chunkvol does)

    @property
    def region(self):
        return self.span or min(self.volume_size, 16 * MiB)

    def as_json(self):
        fields = self._asdict()
        fields["weights"] = [list(item) for item in self.weights]
        return fields

    @classmethod
    def from_json(cls, fields):
        fields = dict(fields)
        fields["weights"] = tuple(tuple(item) for item in fields.get("weights", DEFAULT_WEIGHTS.items()))
        return cls(**fields)

    def with_weights(self, **weights):
        merged = dict(self.weights)
        merged.update(weights)
        return self._replace(weights=tuple(sorted(merged.items())))


class Op(NamedTuple):
    index: int
    kind: str       # write, zero, trim, flush
    offset: int
    length: int
    fua: bool

    @property
    def flush_point(self):
        """Acknowledged, it makes everything acknowledged before it durable."""
        return self.kind == "flush" or self.fua

    @property
    def blocks(self):
        if self.kind == "flush" or not self.length:
            return range(0)
        return range(self.offset // BLOCK, -(-(self.offset + self.length) // BLOCK))


class Workload:
    """The op sequence of one seed. `op(i)` and `data(op)` are pure functions of (seed, i)."""

    def __init__(self, seed, params):
        self.seed = seed
        self.params = params
        self._ops = {}
        self._data = collections.OrderedDict()  # op index -> bytes, most recent last
        self._data_bytes = 0
        names = [name for name, weight in params.weights if weight > 0]
        self._names = names
        self._cumulative = []
        total = 0
        for name, weight in params.weights:
            if weight > 0:
                total += weight
                self._cumulative.append(total)
        self._total = total

    def op(self, index):
        op = self._ops.get(index)
        if op is None:
            op = self._make(index)
            if len(self._ops) > 200_000:
                self._ops.clear()
            self._ops[index] = op
        return op

    def _make(self, index):
        params = self.params
        rng = random.Random(f"op:{self.seed}:{index}")
        region = params.region
        if params.pattern == "stride":
            if params.flush_every and index % params.flush_every == params.flush_every - 1:
                return Op(index, "flush", 0, 0, False)
            groups = region // (16 * BLOCK)
            group = (index * 40503) % groups  # 40503 is odd: a permutation when groups is 2^k
            return Op(index, "write", group * 16 * BLOCK + (index % 16) * BLOCK, BLOCK, False)
        pick = rng.randrange(self._total)
        kind = next(name for name, edge in zip(self._names, self._cumulative) if pick < edge)
        if kind == "flush":
            return Op(index, "flush", 0, 0, False)
        unaligned = rng.random() < params.unaligned
        if kind in ("zero", "trim"):
            limit = params.max_zero
        elif kind == "big":
            limit = params.big_write
        else:
            limit = params.max_write
        limit = max(1, min(limit, region))
        if unaligned:
            length = rng.randint(1, limit)
        else:
            length = rng.randint(1, max(1, limit // BLOCK)) * BLOCK
        if kind == "big":
            length = max(length, min(limit, region) // 2)
        length = min(length, region)
        if unaligned:
            offset = rng.randrange(0, region - length + 1)
        else:
            offset = rng.randrange(0, (region - length) // BLOCK + 1) * BLOCK
        fua = kind == "fua" or (kind in ("zero", "trim") and rng.random() < 0.1)
        return Op(index, "write" if kind in ("write", "fua", "big") else kind, offset, length, fua)

    def data(self, op):
        """The bytes op `op` writes: 512-byte sectors, each starting with its tag."""
        if op.kind != "write":
            return bytes(op.length) if op.kind in ("zero", "trim") else b""
        cached = self._data.get(op.index)
        if cached is not None:
            self._data.move_to_end(op.index)
            return cached
        data = self._generate(op)
        self._data[op.index] = data
        self._data_bytes += len(data)
        while self._data_bytes > DATA_CACHE_BYTES:
            _, old = self._data.popitem(last=False)
            self._data_bytes -= len(old)
        return data

    def _generate(self, op):
        rng = random.Random(f"data:{self.seed}:{op.index}")
        sectors = -(-op.length // SECTOR)
        if rng.random() < self.params.compressible:
            out = bytearray(bytes([rng.randrange(256)]) * (sectors * SECTOR))
        else:
            out = bytearray(rng.randbytes(sectors * SECTOR))
        pack = TAG.pack_into
        seed = self.seed & 0xFFFFFFFFFFFFFFFF
        for sector in range(sectors):
            pack(out, sector * SECTOR, TAG_MAGIC, seed, op.index, sector)
        del out[op.length:]
        return bytes(out)


def describe_tags(block):
    """The (seed, op, sector) tags found in a block: who wrote these bytes."""
    found = []
    position = block.find(TAG_MAGIC)
    while position != -1 and position + TAG.size <= len(block):
        _, seed, index, sector = TAG.unpack_from(block, position)
        found.append((seed, index, sector))
        position = block.find(TAG_MAGIC, position + 1)
    return found


# ---- history and journal ---------------------------------------------------------------

class Entry(NamedTuple):
    """A history entry that is not simply "op `index`, whole": `blocks` set: the op took
    effect on those blocks only (it was cut by a crash); `maybe`: the op failed with an error
    and the server went on, so each of its blocks may or may not have changed."""
    index: int
    blocks: object = None
    maybe: bool = False


def entry_index(entry):
    return entry if isinstance(entry, int) else entry.index


class History:
    """Acknowledged ops in order (`entries`), how many of them are durable (`flushed`), and
    the ops issued but not acknowledged (`inflight`, in issue order). Entries are op indices
    or `Entry` tuples."""

    def __init__(self, workload, journal_path=None, sync=True):
        self.workload = workload
        self.entries = []
        self.flushed = 0
        self.inflight = []
        self.next_index = 0
        self.rebases = 0
        self.journal_path = journal_path
        self.sync = sync
        self._journal = None
        if journal_path is not None:
            self._journal = open(journal_path, "a", buffering=1)
            if self._journal.tell() == 0:
                header = {"seed": workload.seed, "params": workload.params.as_json()}
                self._write(f"{JOURNAL_MAGIC} {json.dumps(header, sort_keys=True)}", sync=True)

    @classmethod
    def load(cls, journal_path, sync=True):
        """Rebuild a History (and its Workload) from a journal; later events append to it."""
        with open(journal_path) as handle:
            lines = handle.read().splitlines()
        if not lines or not lines[0].startswith(JOURNAL_MAGIC + " "):
            raise ValueError(f"{journal_path} is not a workload journal")
        header = json.loads(lines[0][len(JOURNAL_MAGIC) + 1:])
        workload = Workload(header["seed"], Params.from_json(header["params"]))
        history = cls(workload)
        for number, line in enumerate(lines[1:], 2):
            if not line.endswith(" ."):
                break  # a torn last line: as far as anyone knows, the event did not happen
            words = line[:-2].split()
            if words[0] == "I":
                history._issue(int(words[1]))
            elif words[0] == "A":
                history._ack(int(words[1]))
            elif words[0] == "F":
                history._fail(int(words[1]))
            elif words[0] == "R":
                torn = None
                if len(words) > 2:
                    torn = (int(words[2]), tuple(int(b) for b in words[3:]))
                history._rebase(int(words[1]), torn)
            else:
                raise ValueError(f"{journal_path}:{number}: unknown event {line!r}")
        history.journal_path = journal_path
        history.sync = sync
        history._journal = open(journal_path, "a", buffering=1)
        return history

    def close(self):
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _write(self, line, sync):
        self._journal.write(line + "\n")
        if sync:
            self._journal.flush()
            os.fsync(self._journal.fileno())

    # Events: applied, then journaled. An ack is fsynced before the next op is issued.
    def issue(self, index):
        self._issue(index)
        if self._journal is not None:
            self._write(f"I {index} .", sync=False)

    def ack(self, index, sync=None):
        self._ack(index)
        if self._journal is not None:
            self._write(f"A {index} .", sync=self.sync if sync is None else sync)

    def fail(self, index):
        """The server answered op `index` with an error and goes on serving: the op stays in
        the history at this place, its effect unknown block by block (NBD leaves the range of
        a failed write unspecified)."""
        self._fail(index)
        if self._journal is not None:
            self._write(f"F {index} .", sync=self.sync)

    def sync_journal(self):
        if self._journal is not None:
            self._journal.flush()
            os.fsync(self._journal.fileno())

    def rebase(self, result):
        """After a verified restart: the ops the volume showed become the history."""
        torn = None if result.torn is None else (result.torn[0], tuple(sorted(result.torn[1])))
        self._rebase(result.prefix, torn)
        if self._journal is not None:
            extra = "" if torn is None else f" {torn[0]} " + " ".join(map(str, torn[1]))
            self._write(f"R {result.prefix}{extra} .", sync=True)

    def _issue(self, index):
        self.inflight.append(index)
        self.next_index = max(self.next_index, index + 1)

    def _ack(self, index):
        if index in self.inflight:
            self.inflight.remove(index)
        self.next_index = max(self.next_index, index + 1)
        self.entries.append(index)
        if self.workload.op(index).flush_point:
            self.flushed = len(self.entries)

    def _fail(self, index):
        if index in self.inflight:
            self.inflight.remove(index)
        self.next_index = max(self.next_index, index + 1)
        self.entries.append(Entry(index, None, True))

    def _rebase(self, prefix, torn):
        candidates = self.entries + self.inflight
        if prefix < self.flushed or prefix > len(candidates):
            raise ValueError(f"rebase to {prefix} outside [{self.flushed}, {len(candidates)}]")
        entries = candidates[:prefix]
        if torn is not None:
            entries.append(Entry(torn[0], frozenset(torn[1])))
        self.entries = entries
        self.inflight = []
        self.rebases += 1

    def candidates(self):
        return self.entries + self.inflight


# ---- the block image model --------------------------------------------------------------
# An image maps block -> content: bytes (4096), absent for zeros, or a frozenset of such
# values (None for zeros) when a failed op left the block either way.

def _entry_parts(workload, entry):
    if isinstance(entry, int):
        return workload.op(entry), None, False
    return workload.op(entry.index), entry.blocks, entry.maybe


def entry_blocks(workload, entry):
    op, blocks, _ = _entry_parts(workload, entry)
    return op.blocks if blocks is None else blocks


def _splice(old, lo, hi, piece):
    """One block value (None: zeros) with bytes [lo, hi) replaced by `piece`."""
    if lo == 0 and hi == BLOCK:
        new = piece
    else:
        old = ZERO_BLOCK if old is None else old
        new = old[:lo] + piece + old[hi:]
    return None if new == ZERO_BLOCK else new


def apply_op(image, workload, op, only=None, maybe=False, data=None):
    """Apply `op` to `image` on its blocks (those in `only`, if given). Returns them."""
    if op.kind == "flush" or not op.length:
        return ()
    if op.kind == "trim" and not workload.params.trim_zeroes:
        return ()
    if data is None:
        data = workload.data(op)
    start, end = op.offset, op.offset + op.length
    touched = []
    for block in op.blocks:
        if only is not None and block not in only:
            continue
        base = block * BLOCK
        lo, hi = max(start, base), min(end, base + BLOCK)
        piece = data[lo - start:hi - start]
        old = image.get(block)
        if isinstance(old, frozenset):
            new = frozenset(_splice(value, lo - base, hi - base, piece) for value in old)
        else:
            new = _splice(old, lo - base, hi - base, piece)
        if maybe:
            new = (old if isinstance(old, frozenset) else frozenset([old])) | \
                  (new if isinstance(new, frozenset) else frozenset([new]))
        if isinstance(new, frozenset) and len(new) == 1:
            new = next(iter(new))
        if new is None:
            image.pop(block, None)
        else:
            image[block] = new
        touched.append(block)
    return touched


def apply_entry(image, workload, entry, only=None):
    op, blocks, maybe = _entry_parts(workload, entry)
    if blocks is not None:
        only = blocks if only is None else (set(only) & blocks)
    return apply_op(image, workload, op, only, maybe)


def matches(expected, actual):
    """Does block content `actual` (None: zeros) fit the model's `expected`?"""
    if isinstance(expected, frozenset):
        return actual in expected
    return expected == actual


def _example(value):
    if isinstance(value, frozenset):
        return next(iter(value)) if value else None
    return value


class VerifyError(AssertionError):
    pass


class Result(NamedTuple):
    ok: bool
    prefix: int                 # entries (acknowledged, then in-flight) the volume shows
    torn: object                # None, or (op index, blocks) for a partly applied cut op
    flushed: int                # entries that had to be there
    candidates: int             # entries that could have been there
    blocks_checked: int
    lost_flushed: list          # blocks whose flushed content was not found
    problems: list              # human-readable lines
    elapsed: float

    def summary(self):
        return {"ok": self.ok, "prefix": self.prefix, "flushed": self.flushed,
                "candidates": self.candidates, "torn": None if self.torn is None else
                [self.torn[0], len(self.torn[1])], "blocks_checked": self.blocks_checked,
                "lost_flushed_blocks": len(self.lost_flushed), "problems": self.problems[:20],
                "elapsed_s": round(self.elapsed, 3)}


class Oracle:
    """Verifies volumes against a History. Keeps the image at the last flush point between
    calls, so repeated verification of a growing history costs only the new ops."""

    def __init__(self, workload):
        self.workload = workload
        self._base = {}
        self._base_entries = []

    def _base_image(self, entries, flushed):
        done = len(self._base_entries)
        if done > flushed or self._base_entries != entries[:done]:
            self._base, self._base_entries, done = {}, [], 0
        for entry in entries[done:flushed]:
            apply_entry(self._base, self.workload, entry)
        self._base_entries = list(entries[:flushed])
        return self._base

    def verify(self, history, read, atomicity="request", sample=None, check_span=True, rng=None):
        """Check the volume, read through `read(offset, length) -> bytes`.

        check_span: read all of [0, span) and require blocks no op touched to be zeros; else
        read only blocks some op touched (coalesced). sample: with check_span False, check
        only this many of the blocks not touched since the flush point (chosen by `rng`).
        Returns a Result (see `check` for one that raises)."""
        started = time.monotonic()
        workload = self.workload
        entries = list(history.entries)
        candidates = entries + list(history.inflight)
        flushed = history.flushed
        base = self._base_image(entries, flushed)
        after = set()
        for entry in candidates[flushed:]:
            after.update(entry_blocks(workload, entry))
        region_blocks = workload.params.region // BLOCK
        if check_span:
            wanted = None
        else:
            before = set(base)
            for entry in entries[:flushed]:
                before.update(entry_blocks(workload, entry))
            before -= after
            if sample is not None and len(before) > sample:
                rng = rng or random.Random(0)
                before = set(rng.sample(sorted(before), sample))
            wanted = sorted(before | after)
        actual = {}
        problems = []
        lost = []
        checked = 0
        for start, count in _runs(range(region_blocks) if wanted is None else wanted):
            data = read(start * BLOCK, count * BLOCK)
            for i in range(count):
                block = start + i
                found = data[i * BLOCK:(i + 1) * BLOCK]
                found = None if found == ZERO_BLOCK else bytes(found)
                checked += 1
                if block in after:
                    actual[block] = found
                elif not matches(base.get(block), found):
                    lost.append(block)
                    if len(problems) < 10:
                        problems.append(f"block {block} (offset {block * BLOCK}): flushed content lost; "
                                        f"expected {_who(_example(base.get(block)))}, found {_who(found)}")

        # Prefix search from the flush point, over the blocks touched after it.
        work = {block: base[block] for block in after if block in base}
        mismatched = {block for block in after if not matches(work.get(block), actual.get(block))}
        strict = []
        torn_matches = []
        best = (len(mismatched), flushed)
        for position in range(flushed, len(candidates) + 1):
            if not mismatched:
                strict.append(position)
            elif position < len(candidates):
                torn = self._torn_match(work, actual, mismatched, candidates[position])
                if torn is not None:
                    torn_matches.append((position, torn))
            if len(mismatched) < best[0]:
                best = (len(mismatched), position)
            if position == len(candidates):
                break
            for block in apply_entry(work, workload, candidates[position], only=after):
                if matches(work.get(block), actual.get(block)):
                    mismatched.discard(block)
                else:
                    mismatched.add(block)

        prefix, torn = flushed, None
        if strict:
            prefix = strict[-1]
        elif torn_matches:
            prefix, torn_blocks = torn_matches[-1]
            op = workload.op(entry_index(candidates[prefix]))
            torn = (op.index, torn_blocks)
            if atomicity == "request":
                problems.append(f"torn request: op {op.index} ({op.kind} {op.offset}+{op.length}) "
                                f"is applied on {len(torn_blocks)} of its {len(op.blocks)} blocks "
                                f"(after {prefix} whole ops; {flushed} flushed)")
        else:
            problems.append(self._explain(candidates, flushed, best[1], base, after, actual))
        ok = not problems and not lost
        return Result(ok, prefix, torn, flushed, len(candidates), checked, lost, problems,
                      time.monotonic() - started)

    def check(self, history, read, **options):
        """verify(), raising VerifyError with the details on any violation."""
        result = self.verify(history, read, **options)
        if not result.ok:
            raise VerifyError("; ".join(result.problems) or "lost flushed data")
        return result

    def _torn_match(self, work, actual, mismatched, entry):
        """The blocks of `entry` it took effect on, if applying it to some of its blocks
        (each block whole) gives `actual` on every mismatched block; else None."""
        op_blocks = set(entry_blocks(self.workload, entry))
        if len(mismatched) > len(op_blocks) or not mismatched <= op_blocks:
            return None
        trial = {block: work[block] for block in mismatched if block in work}
        apply_entry(trial, self.workload, entry, only=mismatched)
        for block in mismatched:
            if not matches(trial.get(block), actual.get(block)):
                return None
        return frozenset(mismatched)

    def _explain(self, candidates, flushed, position, base, after, actual):
        """Why no prefix fits: at the closest prefix, which blocks differ and who wrote them."""
        work = {block: base[block] for block in after if block in base}
        for entry in candidates[flushed:position]:
            apply_entry(work, self.workload, entry, only=after)
        wrong = sorted(block for block in after if not matches(work.get(block), actual.get(block)))
        lines = [f"no prefix of the {len(candidates)} ops ({flushed} flushed) matches; closest: "
                 f"{position} ops, {len(wrong)} blocks differ"]
        for block in wrong[:6]:
            lines.append(f"block {block}: expected {_who(_example(work.get(block)))}, "
                         f"found {_who(actual.get(block))}")
        return "; ".join(lines)


def _who(value):
    """A short description of a block's content: the tags in it, or zeros."""
    if value is None:
        return "zeros"
    tags = describe_tags(value)
    if not tags:
        return "untagged bytes"
    ops = sorted({(seed, index) for seed, index, _ in tags})
    names = [f"op {index} of seed {seed}" for seed, index in ops[:4]]
    return "data of " + (names[0] if len(names) == 1 else ", ".join(names))


def first_nonzero_block(read, region, step=4 << 20):
    """The first block of [0, region) that is not zeros, or None."""
    for offset in range(0, region, step):
        data = read(offset, min(step, region - offset))
        if data.count(0) != len(data):
            stripped = len(data) - len(bytes(data).lstrip(b"\0"))
            return (offset + stripped) // BLOCK
    return None


def _runs(blocks, limit=1024):
    """Coalesce increasing block numbers into (first, count) runs of at most `limit`."""
    start = count = None
    for block in blocks:
        if start is not None and block == start + count and count < limit:
            count += 1
            continue
        if start is not None:
            yield start, count
        start, count = block, 1
    if start is not None:
        yield start, count


# ---- targets: where ops go -------------------------------------------------------------

class NbdTarget:
    """A libnbd handle."""

    def __init__(self, handle):
        import nbd
        self.handle = handle
        self.fua_flag = nbd.CMD_FLAG_FUA

    def apply(self, workload, op):
        flags = self.fua_flag if op.fua else 0
        if op.kind == "write":
            self.handle.pwrite(workload.data(op), op.offset, flags)
        elif op.kind == "zero":
            self.handle.zero(op.length, op.offset, flags)
        elif op.kind == "trim":
            self.handle.trim(op.length, op.offset, flags)
        else:
            self.handle.flush()

    def read(self, offset, length):
        return self.handle.pread(length, offset)


class VolumeTarget:
    """A chunkvol Volume, in-process."""

    def __init__(self, volume):
        self.volume = volume

    def apply(self, workload, op):
        if op.kind == "write":
            self.volume.write(workload.data(op), op.offset, fua=op.fua)
        elif op.kind == "zero":
            self.volume.zero(op.offset, op.length, fua=op.fua)
        elif op.kind == "trim":
            self.volume.trim(op.offset, op.length, fua=op.fua)
        else:
            self.volume.flush()

    def read(self, offset, length):
        buffer = bytearray(length)
        self.volume.read(buffer, offset)
        return bytes(buffer)


def run(history, target, count, stop=None):
    """Issue `count` ops one at a time from history.next_index; returns how many were
    acknowledged. An exception (the server died) leaves the op in flight and propagates."""
    workload = history.workload
    done = 0
    while done < count and (stop is None or not stop.is_set()):
        index = history.next_index
        history.issue(index)
        target.apply(workload, workload.op(index))
        history.ack(index)
        done += 1
    return done


def run_pipelined(history, handle, count, depth=32, on_poll=None, sync_every=512):
    """Issue `count` ops with up to `depth` in flight (libnbd aio). Acks are journaled in
    completion order and fsynced in groups of `sync_every` (and when this returns or fails):
    the journal is exact for a server crash; a crash of this process may lose the last group
    of acks. Meaningful for prefix checks only if the server handles a connection's requests
    in order (nbdkit --threads 1). A failed op (the server died) raises RuntimeError or
    nbd.Error after every op completed so far has been acknowledged in the history."""
    import nbd
    workload = history.workload
    completed = []
    errors = []

    def completion(index, error):
        if error.value:
            errors.append((index, error.value))
        else:
            completed.append(index)
        return 1

    def take_acks():
        for index in completed:
            history.ack(index, sync=False)
        taken = len(completed)
        completed.clear()
        return taken

    issued = unsynced = 0
    try:
        while issued < count or handle.aio_in_flight():
            while issued < count and handle.aio_in_flight() < depth:
                index = history.next_index
                op = workload.op(index)
                history.issue(index)
                callback = (lambda error, index=index: completion(index, error))
                flags = nbd.CMD_FLAG_FUA if op.fua else 0
                if op.kind == "write":
                    handle.aio_pwrite(workload.data(op), op.offset, completion=callback, flags=flags)
                elif op.kind == "zero":
                    handle.aio_zero(op.length, op.offset, completion=callback, flags=flags)
                elif op.kind == "trim":
                    handle.aio_trim(op.length, op.offset, completion=callback, flags=flags)
                else:
                    handle.aio_flush(completion=callback)
                issued += 1
            handle.poll(-1)
            unsynced += take_acks()
            if unsynced >= sync_every:
                history.sync_journal()
                unsynced = 0
            if errors:
                raise RuntimeError(f"ops failed: {errors[:5]}")
            if on_poll is not None:
                on_poll()
    finally:
        take_acks()
        history.sync_journal()
    return issued


# ---- command line ----------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="NBD Unix socket")
    parser.add_argument("--export", default="disk0")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ops", type=int, default=1000, help="ops to run (after verifying)")
    parser.add_argument("--journal", help="journal file (default ./workload-SEED.journal)")
    parser.add_argument("--span", type=int, default=0, help="bytes of the volume used (default min(size, 16M))")
    parser.add_argument("--verify-only", action="store_true")
    parser.add_argument("--atomicity", choices=("request", "block"), default="request")
    parser.add_argument("--no-fsync", action="store_true", help="do not fsync the journal per ack")
    parser.add_argument("--wipe", action="store_true", help="zero the span first (new journal only)")
    arguments = parser.parse_args(argv)
    import nbd
    handle = nbd.NBD()
    handle.set_export_name(arguments.export)
    handle.connect_unix(arguments.socket)
    journal = arguments.journal or f"workload-{arguments.seed}.journal"
    report = {"seed": arguments.seed, "journal": journal}
    target = NbdTarget(handle)
    if os.path.exists(journal):
        history = History.load(journal, sync=not arguments.no_fsync)
        if history.workload.params.volume_size != handle.get_size():
            raise SystemExit(f"the journal was written against a volume of "
                             f"{history.workload.params.volume_size} bytes, the export has {handle.get_size()}")
        try:
            result = Oracle(history.workload).verify(history, target.read, atomicity=arguments.atomicity)
        except nbd.Error as error:
            report["error"] = f"reading the volume back failed: {error}"
            print(json.dumps(report))
            return 2
        report["verify"] = result.summary()
        if not result.ok:
            print(json.dumps(report))
            return 1
        history.rebase(result)
    else:
        params = Params(volume_size=handle.get_size(), span=arguments.span)
        if arguments.wipe:
            for offset in range(0, params.region, 1 << 30):
                handle.zero(min(1 << 30, params.region - offset), offset)
            handle.flush()
        dirty = first_nonzero_block(target.read, params.region)
        if dirty is not None:
            report["error"] = (f"block {dirty} of the first {params.region} bytes is not zero: the oracle "
                               "assumes a zeroed volume (use --wipe, or a fresh volume)")
            print(json.dumps(report))
            return 2
        history = History(Workload(arguments.seed, params), journal, sync=not arguments.no_fsync)
    if not arguments.verify_only:
        started = time.monotonic()
        first = history.next_index
        try:
            run(history, target, arguments.ops)
        except nbd.Error as error:  # the server died: the journal says what was acknowledged
            report["stopped_by"] = str(error)
        done = sum(1 for entry in history.entries[-(history.next_index - first):] if entry_index(entry) >= first) \
            if history.next_index > first else 0
        report["ops_acknowledged_now"] = done
        report["ops_per_s"] = round(done / max(1e-9, time.monotonic() - started), 1)
    report.update({"acknowledged": len(history.entries), "flushed": history.flushed,
                   "inflight": history.inflight})
    history.close()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
