"""Volume: one virtual disk of a pool: read, write, zero, trim, flush, extents.

write: split at 64 KiB map groups -> one EXTENT record per piece (zstd if it saves space) ->
       append to the log -> map the group -> reply. Sub-block writes read the edge blocks first.
read:  block map lookup per group -> fetch the records (adjacent ones in one pread) -> check
       the header against the map (volume, offset, stamp) and the payload checksum ->
       decompress -> copy; holes read as zeros.
Every method takes the pool lock; errors are chunkvol.errors, mapped to errno by the plugin.
A Volume uses its pool (chunkvol/pool) through the pool's methods and state: it imports
nothing from it. Open one with `open_volume` (or `pool.volume(name)`).
"""

from chunkvol import history
from chunkvol.errors import CorruptionError, OutOfRangeError, ReadOnlyError
from chunkvol.format import group_map
from chunkvol.format import record as record_format
from chunkvol.format.record import (BLOCK_SIZE, CHECKSUM_BYTES, FLAG_MORE, FLAG_TRIM, FLAG_ZSTD, GROUP_BLOCKS,
                                    GROUP_SIZE, HEADER_SIZE, RAW_BLOCK_BYTES, RecordType, block_table, verify_blocks)

import zstandard
import xxhash

_xxh3 = xxhash.xxh3_64_intdigest
_HOLE = group_map.HOLE
_FULL_SLOTS = group_map.FULL_SLOTS
_HOLE_SLOTS = group_map.HOLE_SLOTS
EXTENT_DATA = 0
EXTENT_HOLE_ZERO = 3  # nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
MAX_EXTENT_GROUPS = 16384  # one extents reply covers at most 1 GiB; clients ask again
MAX_HEALS_PER_READ = 8  # damaged records a read heals from mirrors before it gives up (EIO)


def _where(address):
    return f"log address {address >> 40}:{address & ((1 << 40) - 1)}"


def open_volume(pool, name, readonly=False, heal=None):
    """A volume of `pool` by name; `VOL@SNAPSHOT` or `VOL@<UTC time>` is a read-only view of a
    past point. `heal(volume, error)`: called when a read meets a damaged record, True when it
    healed it from a mirror (heal.heal_read; without it such a read fails)."""
    if "@" in name:
        with pool.lock:
            point = history.resolve_point(pool, name)
        return Volume(pool, point.info, readonly=True, point=point, heal=heal)
    info = pool.volume_info(name)
    return Volume(pool, info, readonly=readonly or pool.readonly or pool.role == "mirror"
                  or not pool.writable_here(info), heal=heal)


class Volume:
    """A volume, or (with `point`, see history.Point) a read-only view of it at a past point."""

    def __init__(self, pool, info, readonly=False, point=None, heal=None):
        self.pool = pool
        self.heal = heal
        self.info = info
        self.volume_id = info.volume_id
        self.readonly = readonly or point is not None
        self.compress = info.compression == "zstd"
        self.point = point
        self.at = point.stamp if point is not None else None
        # A clone reads its parent's records for blocks it never wrote: their headers name
        # the parent (or its parent), and that is no misdirection.
        lineage = [info.volume_id]
        parent = info.parent
        while parent:
            lineage.append(parent["id"])
            ancestor = pool.volumes_by_id.get(parent["id"])
            parent = ancestor.parent if ancestor is not None else None
        self.lineage = frozenset(lineage)

    @property
    def name(self):
        return self.info.name if self.point is None else self.point.label

    @property
    def size_bytes(self):
        return self.info.size_bytes if self.point is None else self.point.size_bytes

    def _check(self, offset, length, writing=False):
        if writing and (self.readonly or (self.info.mode == "single-primary"
                                          and not self.pool.writable_here(self.info))):
            # (A single-primary volume promoted on another node stops taking writes here the
            # moment that promotion arrives, also on connections opened before.)
            raise ReadOnlyError(f"volume {self.name!r} is read-only here")
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise OutOfRangeError(f"request [{offset}, +{length}) is outside volume {self.name!r} "
                                  f"of {self.size_bytes} bytes")
        if self.pool.volumes_by_id.get(self.volume_id) is not self.info:
            raise OutOfRangeError(f"volume {self.name!r} was removed")

    # ---- write ----------------------------------------------------------------------
    def write(self, data, offset, fua=False):
        length = len(data)
        self._check(offset, length, writing=True)
        if not length:
            return
        pool = self.pool
        with pool.lock:
            if offset % BLOCK_SIZE or length % BLOCK_SIZE:
                data, offset = self._widen(data, offset)
            with pool.request():
                self._write_blocks(memoryview(data), offset, last=True)
            pool.maybe_auto_flush()
        if fua:
            pool.flush()

    def _widen(self, data, offset):
        """Read-modify-write: the whole blocks around an unaligned write."""
        start = offset - offset % BLOCK_SIZE
        end = -(-(offset + len(data)) // BLOCK_SIZE) * BLOCK_SIZE
        merged = bytearray(end - start)
        self._read_locked(memoryview(merged)[:BLOCK_SIZE], start)
        if end - start > BLOCK_SIZE:
            self._read_locked(memoryview(merged)[-BLOCK_SIZE:], end - BLOCK_SIZE)
        merged[offset - start:offset - start + len(data)] = data
        return merged, start

    def _write_blocks(self, view, offset, last):
        """One EXTENT record per map-group piece, then the group's new state (inlined: this is
        the hot path of every write). Every record but the request's `last` one says MORE."""
        pool = self.pool
        append = pool.writer.append
        clock = pool.clock
        node = pool.node_id
        blockmap = pool.blockmap
        overlay = blockmap.overlay
        dirty = blockmap.dirty
        undo = blockmap.undo
        compressor = pool.compressor if self.compress else None
        volume_id = self.volume_id
        position = 0
        total = len(view)
        while position < total:
            block = (offset + position) // BLOCK_SIZE
            group, first = divmod(block, GROUP_BLOCKS)
            count = min(GROUP_BLOCKS - first, (total - position) // BLOCK_SIZE)
            piece_bytes = count * BLOCK_SIZE
            piece = view[position:position + piece_bytes]
            table = b""
            flags = 0
            payload = None
            if compressor is not None:
                packed = compressor.compress(piece)
                if len(packed) + 512 < piece_bytes:  # keep raw unless it saves a sector
                    payload = packed
                    flags = FLAG_ZSTD
            if payload is None:
                payload = piece
                table = block_table(piece)
            if not last or position + piece_bytes < total:
                flags |= FLAG_MORE
            sequence = pool.next_sequence
            pool.next_sequence = sequence + 1
            hlc = clock.now()
            address = append(RecordType.EXTENT, flags, volume_id, payload, node, sequence, hlc,
                             block * BLOCK_SIZE, piece_bytes, table)
            ref = (address, len(table) + len(payload), hlc, flags & FLAG_ZSTD)
            key = (volume_id, group)
            if count == GROUP_BLOCKS:
                state = (_FULL_SLOTS, (ref,))
            else:
                state = overlay.get(key)
                if state is None:
                    state = blockmap.stored_state(blockmap.reader(), volume_id, group)
                state = group_map.apply_write(state, first, count, ref)
            if undo is not None:
                undo.append((key, overlay.get(key), dirty.get(key)))
            overlay[key] = state
            dirty[key] = (hlc, node)
            position += piece_bytes
        written = blockmap.written
        written[volume_id] = written.get(volume_id, 0) + total

    # ---- zero and trim ----------------------------------------------------------------
    def zero(self, offset, length, fua=False, trim=False):
        self._check(offset, length, writing=True)
        if not length:
            return
        pool = self.pool
        with pool.lock, pool.request():
            start = -(-offset // BLOCK_SIZE) * BLOCK_SIZE
            end = (offset + length) // BLOCK_SIZE * BLOCK_SIZE
            if start >= end:  # inside one block: write zeros
                self._write_blocks(*self._widen_zero(offset, length), last=True)
            else:
                if start > offset:
                    self._write_blocks(*self._widen_zero(offset, start - offset), last=False)
                if offset + length > end:
                    self._write_blocks(*self._widen_zero(end, offset + length - end), last=False)
                _, hlc = pool.append(RecordType.ZERO, FLAG_TRIM if trim else 0, self.volume_id, b"",
                                      start, end - start)
                pool.map_hole(self.volume_id, start, end - start, hlc, pool.node_id)
                pool.count_written(self.volume_id, end - start)
        with pool.lock:
            pool.maybe_auto_flush()
        if fua:
            pool.flush()

    def _widen_zero(self, offset, length):
        merged, start = self._widen(bytes(length), offset)
        return memoryview(merged), start

    def trim(self, offset, length, fua=False):
        self.zero(offset, length, fua=fua, trim=True)

    def flush(self):
        self.pool.flush()

    # ---- read -------------------------------------------------------------------------
    def read(self, buffer, offset):
        """Fill `buffer` (a writable buffer) with bytes [offset, offset+len(buffer))."""
        length = len(buffer)
        self._check(offset, length)
        if not length:
            return
        for _ in range(MAX_HEALS_PER_READ):
            try:
                return self._read(buffer, offset, length)
            except CorruptionError as error:
                if self.heal is None or not self.heal(self, error):
                    raise
        self._read(buffer, offset, length)  # healed from a mirror: read it again

    def lineage_ids(self):
        return sorted(self.lineage)

    def _read(self, buffer, offset, length):
        with self.pool.lock:
            if offset % BLOCK_SIZE or length % BLOCK_SIZE:
                start = offset - offset % BLOCK_SIZE
                end = -(-(offset + length) // BLOCK_SIZE) * BLOCK_SIZE
                scratch = bytearray(end - start)
                self._read_locked(memoryview(scratch), start, self.at)
                memoryview(buffer)[:] = memoryview(scratch)[offset - start:offset - start + length]
            else:
                self._read_locked(memoryview(buffer).cast("B"), offset, self.at)

    def _read_locked(self, out, offset, hlc=None):
        """Aligned read into memoryview `out`: plan the pieces, then fetch records."""
        blockmap = self.pool.blockmap
        volume_id = self.volume_id
        first_block = offset // BLOCK_SIZE
        end_block = first_block + len(out) // BLOCK_SIZE
        pieces = []  # (ref, block_in_record, block_count, out_offset, record's volume offset)
        overlay = blockmap.overlay
        txn = None  # taken on the first group not in the overlay
        block = first_block
        while block < end_block:
            group, first = divmod(block, GROUP_BLOCKS)
            count = min(GROUP_BLOCKS - first, end_block - block)
            state = overlay.get((volume_id, group)) if hlc is None else None
            if state is None:
                if txn is None:
                    txn = blockmap.reader()
                state = blockmap.stored_state(txn, volume_id, group, hlc)
            out_offset = (block - first_block) * BLOCK_SIZE
            if state is None or state[0] == _HOLE_SLOTS:
                out[out_offset:out_offset + count * BLOCK_SIZE] = bytes(count * BLOCK_SIZE)
            elif state[0] == _FULL_SLOTS:
                pieces.append((state[1][0], first, count, out_offset, group * GROUP_SIZE))
            else:
                self._plan_mixed(state, group, first, count, out, out_offset, pieces)
            block += count
        if pieces:
            self._fetch(pieces, out)

    @staticmethod
    def _plan_mixed(state, group, first, count, out, out_offset, pieces):
        slots, refs = state
        index = first
        end = first + count
        while index < end:
            slot = slots[index]
            run = 1
            while index + run < end and slots[index + run] == (slot + run if slot != _HOLE else _HOLE):
                run += 1
            at = out_offset + (index - first) * BLOCK_SIZE
            if slot == _HOLE:
                out[at:at + run * BLOCK_SIZE] = bytes(run * BLOCK_SIZE)
            else:
                record_block = group * GROUP_BLOCKS + index - (slot & 0x0F)
                pieces.append((refs[slot >> 4], slot & 0x0F, run, at, record_block * BLOCK_SIZE))
            index += run

    def _fetch(self, pieces, out):
        """Read the records behind `pieces` (ref, block_in_record, block_count, out_offset).
        Records adjacent in the log are read with one pread when most of the span is wanted;
        a few blocks of a large raw record are read alone with their checksum table."""
        writer = self.pool.writer
        index = 0
        total = len(pieces)
        while index < total:
            ref = pieces[index][0]
            span_start = last_address = ref[0]
            span_end = span_start + HEADER_SIZE + ref[1]
            wanted = pieces[index][2]
            last = index + 1
            while last < total:
                next_address = pieces[last][0][0]
                if next_address == span_end:
                    span_end += HEADER_SIZE + pieces[last][0][1]
                    last_address = next_address
                elif next_address != last_address:
                    break
                wanted += pieces[last][2]
                last += 1
            current = pieces[index]
            try:
                if wanted * BLOCK_SIZE * 2 >= span_end - span_start:
                    data = memoryview(writer.read(span_start, span_end - span_start))
                    for current in pieces[index:last]:
                        ref, first, count, at, record_offset = current
                        start = ref[0] - span_start
                        self._copy_blocks(ref, data[start:start + HEADER_SIZE + ref[1]], first, count, out, at,
                                          record_offset)
                else:
                    for current in pieces[index:last]:
                        ref, first, count, at, record_offset = current
                        self._read_blocks(ref, first, count, out, at, record_offset)
            except CorruptionError as error:
                error.damage = (current[0], current[4])  # which record, for healing from a mirror (heal.py)
                raise
            index = last

    def _header(self, ref, raw, record_offset):
        """Check a fetched record's header against its map entry: stamp, volume, length, and
        the volume offset the map expects it to hold (a misdirected entry is caught)."""
        try:
            header = record_format.decode_header(raw[:HEADER_SIZE])
        except CorruptionError as error:
            raise CorruptionError(f"{error} at {_where(ref[0])}") from None
        if (header[6] != ref[2] or header[2] not in self.lineage or header[0] != RecordType.EXTENT
                or header[3] != ref[1] or header[7] != record_offset):
            raise CorruptionError(f"record at {_where(ref[0])} is not the one the block map expects")
        return header

    @staticmethod
    def _verify(header, table, blocks, first, count, address):
        try:
            verify_blocks(header, table, blocks, first, count)
        except CorruptionError as error:
            raise CorruptionError(f"{error} at {_where(address)}") from None

    def _copy_blocks(self, ref, raw, first, count, out, at, record_offset):
        """Blocks [first, first+count) of a whole record in memory -> out[at:]."""
        address, stored_length, _, flags = ref
        if len(raw) != HEADER_SIZE + stored_length:
            raise CorruptionError(f"record at {_where(address)} is cut short")
        header = self._header(ref, raw, record_offset)
        size = count * BLOCK_SIZE
        if flags & FLAG_ZSTD:
            payload = self._decompress(header, raw[HEADER_SIZE:], address)
            out[at:at + size] = payload[first * BLOCK_SIZE:first * BLOCK_SIZE + size]
            return
        table_bytes = header[8] // BLOCK_SIZE * CHECKSUM_BYTES
        data_at = HEADER_SIZE + table_bytes + first * BLOCK_SIZE
        blocks = raw[data_at:data_at + size]
        self._verify(header, raw[HEADER_SIZE:HEADER_SIZE + table_bytes], blocks, first, count, address)
        out[at:at + size] = blocks

    def _read_blocks(self, ref, first, count, out, at, record_offset):
        """Blocks of a raw record read alone: header and table, then the blocks straight into out."""
        address, stored_length, _, flags = ref
        if flags & FLAG_ZSTD:
            raw = memoryview(self.pool.writer.read(address, HEADER_SIZE + stored_length))
            self._copy_blocks(ref, raw, first, count, out, at, record_offset)
            return
        writer = self.pool.writer
        table_bytes = stored_length // RAW_BLOCK_BYTES * CHECKSUM_BYTES
        raw = writer.read(address, HEADER_SIZE + table_bytes)
        if len(raw) != HEADER_SIZE + table_bytes:
            raise CorruptionError(f"record at {_where(address)} is cut short")
        header = self._header(ref, raw, record_offset)
        size = count * BLOCK_SIZE
        target = out[at:at + size]
        writer.read_into(address + HEADER_SIZE + table_bytes + first * BLOCK_SIZE, target)
        self._verify(header, memoryview(raw)[HEADER_SIZE:], target, first, count, address)

    def _decompress(self, header, frame, address):
        if _xxh3(frame) != header[9]:
            raise CorruptionError(f"record payload checksum mismatch at {_where(address)}")
        length = header[8]
        declared = zstandard.frame_content_size(frame)
        if declared != length or length > GROUP_SIZE:
            raise CorruptionError(f"compressed record at {_where(address)} declares {declared} bytes, "
                                  f"expected {length}")
        try:
            data = self.pool.decompressor.decompress(frame, max_output_size=length)
        except zstandard.ZstdError as error:
            raise CorruptionError(f"compressed record at {_where(address)} does not decompress ({error})") from None
        if len(data) != length:
            raise CorruptionError(f"compressed record at {_where(address)} holds {len(data)} bytes, expected {length}")
        return memoryview(data)

    # ---- extents and cache ------------------------------------------------------------
    def extents(self, offset, length):
        """[(offset, length, type)] from `offset`: type 0 data, 3 hole (reads as zeros)."""
        self._check(offset, length)
        result = []
        end = offset + length
        first_group = offset // GROUP_SIZE
        end_group = min(-(-end // GROUP_SIZE), first_group + MAX_EXTENT_GROUPS)
        limit_bytes = min(end, end_group * GROUP_SIZE)
        blockmap = self.pool.blockmap

        def add(start, stop, kind):
            start, stop = max(start, offset), min(stop, limit_bytes)
            if start >= stop:
                return
            if result and result[-1][2] == kind and result[-1][0] + result[-1][1] == start:
                result[-1] = (result[-1][0], stop - result[-1][0], kind)
            else:
                result.append((start, stop - start, kind))

        with self.pool.lock:
            txn = blockmap.reader()
            cursor_group = first_group
            for group in blockmap.groups_in(txn, self.volume_id, first_group, end_group, MAX_EXTENT_GROUPS):
                add(cursor_group * GROUP_SIZE, group * GROUP_SIZE, EXTENT_HOLE_ZERO)
                if self.at is None:
                    state = blockmap.get(txn, self.volume_id, group)
                else:
                    state = blockmap.stored_state(txn, self.volume_id, group, self.at)
                slots = state[0] if state is not None else _HOLE_SLOTS
                base = group * GROUP_SIZE
                if slots == _HOLE_SLOTS or _HOLE not in slots:
                    add(base, base + GROUP_SIZE, EXTENT_HOLE_ZERO if slots == _HOLE_SLOTS else EXTENT_DATA)
                    cursor_group = group + 1
                    continue
                for index in range(GROUP_BLOCKS):
                    add(base + index * BLOCK_SIZE, base + (index + 1) * BLOCK_SIZE,
                        EXTENT_HOLE_ZERO if slots[index] == _HOLE else EXTENT_DATA)
                cursor_group = group + 1
            add(cursor_group * GROUP_SIZE, end_group * GROUP_SIZE, EXTENT_HOLE_ZERO)
        return result

    def cache(self, offset, length):
        """Warm the page cache for a range by reading it (and verifying it) once."""
        step = 4 << 20
        while length > 0:
            chunk = min(step, length)
            self.read(bytearray(chunk), offset)
            offset += chunk
            length -= chunk
