"""Good copies of damaged records from an object-store mirror (`rados:...`, `s3:...`), for
self-healing (heal.py).

The store holds each node's records in the segments that node shipped
(mirror/object_target.py, format/segment.py). A damaged record is known here by its block-map
ref (address, stored length, stamp, flags) and the volume offset its map expects. Its copy is
found so:

1. List the pool's segments once per heal pass (`chunkvol/POOL_UUID/log/`), by origin; only
   origins whose node index is the stamp's low bits can hold it (clock.py).
2. In each such origin's segments (name order is sequence order, and within one origin stamps
   grow with sequence) find the one whose [first_stamp, last_stamp] holds the stamp by a
   binary search over headers: one ranged read of 120 bytes each, kept for the pass.
3. Fetch that segment (at most the bytes its header declares, and one more to notice an
   object longer than that) and check it as restore does: header checksum, the name it was
   found under (pool, origin, sequences), payload length and checksum, record framing.
   A fetched segment is kept for the pass (a scrub often heals several records of one
   batch), within CACHE_BYTES.
4. Take the EXTENT with that stamp and volume offset, and check it: its own header and
   payload checksums (record.decode_header, record.verify_payload), its origin, and the
   stored length, flags and volume the map expects.

A segment or record that fails any check is never returned: the lookup goes on (another
origin, another mirror) or finds nothing, and the damaged record stays unhealed. A store that
cannot be reached (after its retries) or refuses the credentials is given up for the rest of
the pass, so one heal waits for it once.
"""

from collections import OrderedDict

from chunkvol.clock import node_index, node_index_of
from chunkvol.errors import ChunkvolError, CorruptionError, NotFoundError
from chunkvol.format import record, segment
from chunkvol.format.record import FLAG_RELOCATED, FLAG_ZSTD, HEADER_SIZE, RecordType
from chunkvol.objstore import open_store
from chunkvol.objstore.sealed_store import open_pool

CACHE_BYTES = 64 << 20  # fetched segments kept per store for one heal pass (at least one)


class SegmentCopies:
    """One object-store mirror during one heal pass: opened at the first lookup."""

    def __init__(self, url, pool_uuid, retry_seconds=None, store=None, key=None):
        """`store`: one already open (an ObjectTarget's), used and left open; else one is
        opened at the first lookup (through `key`, the mirror's StoreKey, when it has one) and
        closed by `close`."""
        self.url = url
        self.pool_uuid = pool_uuid
        self.retry_seconds = retry_seconds
        self.key = key
        self.store = store
        self.owns_store = store is None
        self.failed = None  # the error that made this pass give the store up
        self.origins = None  # origin -> [segment names in sequence order]
        self.headers = {}  # name -> SegmentHeader, or None when it fails its checks
        self.segments = OrderedDict()  # name -> {(stamp, volume offset): record view}, or None
        self.cached_bytes = 0

    def find(self, volume_ids, ref, record_offset):
        """(raw bytes, header) of the store's good copy of record `ref`, or None."""
        if self.failed is not None:
            return None
        try:
            return self._find(volume_ids, ref, record_offset)
        except ChunkvolError as error:  # unreachable after retries, access denied, no bucket or pool
            self.failed = error
            return None
        except ImportError as error:  # boto3 or rados missing where this runs
            self.failed = ChunkvolError(f"{self.url}: {error}")
            return None

    def _find(self, volume_ids, ref, record_offset):
        _, _, stamp, _ = ref
        for origin, names in sorted(self._origins().items()):
            if node_index(origin) != node_index_of(stamp):
                continue
            name = self._segment_holding(names, stamp)
            if name is None:
                continue
            found = self._records(name).get((stamp, record_offset))
            if found is None:
                continue
            checked = _checked(found, origin, volume_ids, ref, record_offset)
            if checked is not None:
                return checked
        return None

    def _origins(self):
        if self.origins is None:
            if self.store is None:
                store = open_store(self.url, self.retry_seconds)
                try:
                    self.store = open_pool(store, self.pool_uuid, self.key)
                except BaseException:
                    store.close()
                    raise
            self.origins = {}
            for name in self.store.list(segment.pool_prefix(self.pool_uuid) + "log/"):
                parsed = segment.parse_name(name)
                if parsed is not None and parsed[0] == self.pool_uuid:
                    self.origins.setdefault(parsed[1], []).append(name)
        return self.origins

    def _header(self, name):
        if name not in self.headers:
            try:
                self.headers[name] = segment.decode_header(self.store.get(name, 0, segment.HEADER_SIZE), name)
            except (CorruptionError, NotFoundError):
                self.headers[name] = None
        return self.headers[name]

    def _segment_holding(self, names, stamp):
        """The name of the segment whose stamps span `stamp` (binary search), or None."""
        low, high = 0, len(names)
        while low < high:
            probe = self._good_header_near(names, low, high, (low + high) // 2)
            if probe is None:
                return None
            header = self.headers[names[probe]]
            if stamp < header.first_stamp:
                high = probe
            elif stamp > header.last_stamp:
                low = probe + 1
            else:
                return names[probe]
        return None

    def _good_header_near(self, names, low, high, middle):
        """The index in [low, high) nearest `middle` whose header is good (a damaged header
        only costs the search more reads), or None."""
        for distance in range(high - low):
            for index in (middle - distance, middle + distance):
                if low <= index < high and self._header(names[index]) is not None:
                    return index
        return None

    def _records(self, name):
        """{(stamp, volume offset): record view} of the EXTENTs of a segment that passed its
        checks; empty when it did not."""
        if name in self.segments:
            self.segments.move_to_end(name)
            return self.segments[name] or {}
        header = self.headers[name]
        records = None
        try:
            data = self.store.get(name, 0, segment.HEADER_SIZE + header.payload_bytes + 1)
            fetched = segment.decode_header(data, name)
            if fetched.digest == header.digest:
                records = {}
                for view in segment.split_records(data, fetched, name):
                    fields = record.decode_header(view[:HEADER_SIZE])
                    if fields.record_type == RecordType.EXTENT and not fields.flags & FLAG_RELOCATED:
                        records[(fields.hlc, fields.offset_bytes)] = view
        except (CorruptionError, NotFoundError):
            records = None
        self._keep(name, records, header.payload_bytes if records is not None else 0)
        return records or {}

    def _keep(self, name, records, size_bytes):
        self.segments[name] = records
        self.cached_bytes += size_bytes
        while self.cached_bytes > CACHE_BYTES and len(self.segments) > 1:
            old_name, old_records = self.segments.popitem(last=False)
            if old_records is not None:
                self.cached_bytes -= self.headers[old_name].payload_bytes

    def close(self):
        self.segments.clear()
        if self.store is not None and self.owns_store:
            self.store.close()
        self.store = None


def _checked(view, origin, volume_ids, ref, record_offset):
    """(bytes, header) of a segment's record when it is good and the one `ref` names."""
    data = bytes(view)
    try:
        header = record.decode_header(memoryview(data)[:HEADER_SIZE])
        record.verify_payload(header, memoryview(data)[HEADER_SIZE:])
    except CorruptionError:
        return None
    _, stored_length, stamp, flags = ref
    if (header.record_type != RecordType.EXTENT or header.origin_node != origin or header.hlc != stamp
            or header.stored_length != stored_length or (header.flags & FLAG_ZSTD) != flags
            or header.offset_bytes != record_offset or header.volume_id not in volume_ids):
        return None
    return data, header


class PassStores:
    """The object-store mirrors of a pool for one heal pass: each opened when first asked."""

    def __init__(self, pool_uuid, retry_seconds=None):
        self.pool_uuid = pool_uuid
        self.retry_seconds = retry_seconds
        self.open = {}

    def find(self, url, volume_ids, ref, record_offset, key=None):
        """The good copy in the store at `url` (sealed with StoreKey `key`, if given), or None."""
        copies = self.open.get(url)
        if copies is None:
            copies = self.open[url] = SegmentCopies(url, self.pool_uuid, self.retry_seconds, key=key)
        return copies.find(volume_ids, ref, record_offset)

    def close(self):
        for copies in self.open.values():
            try:
                copies.close()
            except (ChunkvolError, OSError):
                pass
        self.open.clear()
