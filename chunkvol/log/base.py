"""Finding and loading the newest base (format/base.py): the block map as of a log address P,
written into the log by compaction (compaction.write_base), so a rebuild of the map does not
need the chunks compaction freed. Also what a base holds (`entries_of`), so that writing and
loading one agree.

A base is used only whole: its BASE_END and every fragment it lists valid and naming the same
P. The hint POOL/base names the newest BASE_END's address; without it (or when it is stale)
the log is scanned for BASE_END records, newest first.
"""

import os

from chunkvol.errors import CorruptionError, FormatError
from chunkvol.format import base as base_format
from chunkvol.format import checkpoint as checkpoint_format
from chunkvol.format import chunk_header, record
from chunkvol.format import tombstones as tombstones_format
from chunkvol.format.record import HEADER_SIZE, RecordType
from chunkvol.index.blockmap import ORIGIN_STAMPS_KEY, ORIGINS_KEY, REMOVED_VOLUMES_KEY, TOMBSTONES_KEY
from chunkvol.log.reader import ChunkScan

HINT_NAME = "base"
BASE_META_KEYS = (ORIGINS_KEY, ORIGIN_STAMPS_KEY, REMOVED_VOLUMES_KEY)  # the rest of meta: checkpoint, in BASE_END
TOMBSTONES_PER_ENTRY = 1000  # 40 KB: one base entry stays within a fragment


def entries_of(stored):
    """The (db, key, value) entries of a base of `stored` (a BlockMap.stored() snapshot)."""
    yield from stored.entries()
    for key in BASE_META_KEYS:
        value = stored.meta(key)
        if value is not None:
            yield base_format.DB_META, key, value
    # Tombstones, in pieces: a rebuild without them would let a late record of another node
    # that is older than a hole here win over the hole, and the nodes would diverge.
    raw = stored.meta(TOMBSTONES_KEY)
    entries = [] if raw is None else tombstones_format.decode(raw, stored.path)
    for index in range(0, len(entries), TOMBSTONES_PER_ENTRY):
        yield (base_format.DB_META, b"%s/%d" % (TOMBSTONES_KEY, index // TOMBSTONES_PER_ENTRY),
               tombstones_format.encode(entries[index:index + TOMBSTONES_PER_ENTRY]))


def find_base(chunks, pool_path, pool_uuid):
    """The newest complete base: (checkpoint, [data fragment addresses]) or None, every
    fragment read and checked. Tries the hint, then scans the whole log for BASE_END records
    (newest first)."""
    candidates = []
    try:
        with open(os.path.join(pool_path, HINT_NAME), "rb") as handle:
            candidates.append(int(handle.read(32).strip() or b"0"))
    except (OSError, ValueError):
        pass
    tried = set()
    for address in candidates:
        tried.add(address)
        found = _read_base(chunks, pool_uuid, address)
        if found is not None:
            return found
    ends = []
    for chunk_id in chunks.ids():
        for offset, header, _ in ChunkScan(chunks, chunk_id, chunk_header.DATA_OFFSET, verify_payloads=False):
            if header.record_type == RecordType.BASE_END:
                ends.append(chunk_header.address(chunk_id, offset))
    for address in sorted(ends, reverse=True):
        if address not in tried:
            found = _read_base(chunks, pool_uuid, address)
            if found is not None:
                return found
    return None


def load_base(chunks, pool_path, pool_uuid, blockmap):
    """At a rebuild: fill the empty block map from the newest base; its checkpoint, or None."""
    found = find_base(chunks, pool_path, pool_uuid)
    if found is None:
        return None
    checkpoint, addresses = found
    blockmap.load(_loadable(_base_entries(chunks, checkpoint, addresses), pool_path), checkpoint)
    return checkpoint


def _loadable(entries, path):
    """A base's entries as the block map holds them: its tombstones joined again."""
    tombstones = []
    for db_id, key, value in entries:
        if db_id != base_format.DB_META or key in BASE_META_KEYS:
            yield db_id, key, value
        elif key.startswith(TOMBSTONES_KEY + b"/"):
            tombstones += tombstones_format.decode(value, path)
        # anything else in meta: the checkpoint comes from BASE_END alone
    if tombstones:
        yield base_format.DB_META, TOMBSTONES_KEY, tombstones_format.encode(tombstones)


def _read_record(chunks, address, expected_type):
    chunk_id, offset = chunk_header.split_address(address)
    if chunk_id not in chunks.chunks:
        return None
    raw = chunks.pread(chunk_id, HEADER_SIZE, offset)
    try:
        header = record.decode_header(raw)
    except CorruptionError:
        return None
    if header.record_type != expected_type:
        return None
    payload = chunks.pread(chunk_id, header.stored_length, offset + HEADER_SIZE)
    try:
        record.verify_payload(header, memoryview(payload))
    except CorruptionError:
        return None
    return header, payload


def _read_base(chunks, pool_uuid, end_address):
    found = _read_record(chunks, end_address, RecordType.BASE_END)
    if found is None:
        return None
    header, payload = found
    try:
        raw_checkpoint, addresses, levels = base_format.decode_end(payload)
        checkpoint = checkpoint_format.decode(raw_checkpoint)
    except (FormatError, CorruptionError):
        return None
    # A base's records carry its P in offset_bytes (format/base.py).
    if checkpoint.pool_uuid != pool_uuid or checkpoint.log_address != header.offset_bytes:
        return None
    try:
        if levels:
            listed = []
            for index, address in enumerate(addresses):
                listed += base_format.decode_index_fragment(_fragment(chunks, address, checkpoint),
                                                            checkpoint.log_address, index)
            addresses = listed
        for _ in _base_entries(chunks, checkpoint, addresses):
            pass  # every fragment checked before the base is used
    except (FormatError, CorruptionError):
        return None
    return checkpoint, addresses


def _fragment(chunks, address, checkpoint):
    fragment = _read_record(chunks, address, RecordType.BASE)
    if fragment is None or fragment[0].offset_bytes != checkpoint.log_address:
        raise FormatError(f"base fragment at {address:#x} is missing, damaged or of another base")
    return fragment[1]


def _base_entries(chunks, checkpoint, addresses):
    """The (db, key, value) entries of a base, one fragment in memory at a time."""
    for index, address in enumerate(addresses):
        yield from base_format.decode_fragment(_fragment(chunks, address, checkpoint), checkpoint.log_address, index)
