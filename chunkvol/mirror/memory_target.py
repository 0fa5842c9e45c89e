"""A target that keeps what it is sent in memory, in lists: for tests, and the reference the
other targets are held to (tests/mirror/test_target_conformance.py).

It checks a batch with the receiver's own rules (receiver.check_origin, receiver.checked),
keeping as its state the receiver's Catalogue of volumes that a batch leaves behind, instead
of wrapping a pool on tmpfs: a pool would make it a second dir: target, exercising the log,
the block map and the sync again, while the reference should share only the rules a target
must keep (mirror/target.py) and be small enough to read at a glance.
"""

import threading
import time

from chunkvol.format import record
from chunkvol.format.record import FLAG_ZSTD, HEADER_SIZE, RecordType
from chunkvol.mirror import receiver


class MemoryStore:
    """What memory targets hold, shared by every target opened on it (as a dir: pool is by
    every DirTarget opened on its path), so it outlives a target's close, as a mirror
    outlives a dropped connection."""

    node_id = None  # no node of the pool: it never writes, so no origin is its own

    def __init__(self, pool_uuid):
        self.pool_uuid = pool_uuid
        self.records = {}  # origin -> [bytes of each record taken, in sequence order]
        self.held = {}  # origin -> greatest sequence taken
        self.catalogue = receiver.Catalogue({}, (), (), wall_ns=0)
        self.lock = threading.Lock()


class MemoryTarget:
    """A Target (mirror/target.py) on a MemoryStore (a new one when none is given)."""

    READ_AHEAD = False

    def __init__(self, source_fields, store=None, wall=time.time_ns):
        self.pool_uuid = bytes.fromhex(source_fields["pool_uuid"])
        self.store = store if store is not None else MemoryStore(self.pool_uuid)
        self.wall = wall

    def have(self, origin):
        with self.store.lock:
            return self.store.held.get(origin, 0)

    def send(self, origin, records):
        store = self.store
        receiver.check_origin(store, self.pool_uuid, origin)
        with store.lock:
            held = store.held.get(origin, 0)
            store.catalogue.wall_ns = self.wall()  # the skew rule reads this node's clock now
            taken, catalogue = receiver.checked(origin, held, records, store.catalogue)
            if taken:
                # Sequences strictly grow in a checked batch, so what was held already is a
                # prefix: the records taken are the batch's last len(taken).
                store.records.setdefault(origin, []).extend(bytes(raw) for raw in records[len(records) - len(taken):])
                store.held[origin] = taken[-1][0].origin_sequence
                store.catalogue = catalogue
            return store.held.get(origin, 0)

    def fetch(self, volume_ids, group, ref, record_offset):
        _, stored_length, stamp, flags = ref
        with self.store.lock:
            for records in self.store.records.values():
                for raw in records:
                    header = record.decode_header(memoryview(raw)[:HEADER_SIZE])
                    if (header.record_type == RecordType.EXTENT and header.hlc == stamp
                            and header.stored_length == stored_length and (header.flags & FLAG_ZSTD) == flags
                            and header.offset_bytes == record_offset and header.volume_id in volume_ids):
                        return raw
        return None

    def describe(self):
        with self.store.lock:
            return {"memory": {str(origin): held for origin, held in sorted(self.store.held.items())}}

    def close(self):
        pass  # nothing open: the records stay in the store
