"""A mirror in an object store (`rados:...` or `s3:...`, chunkvol/objstore): every batch the
shipper sends becomes one immutable segment object (format/segment.py), chained to the
origin's previous one. Nothing is ever overwritten, so a crash between two uploads leaves a
whole chain; a batch sent again after a lost reply is stored again under the same name with
the same bytes.

What the store holds of an origin is the last segment of its chain: found by listing at the
first use, then tracked here.

With a key (`mirror add --key`), every object of the pool is sealed (objstore/sealed_store.py):
the store sees only ciphertext, and the pool's marker says which key opens it, so a mirror
added without the key, or with another, is refused before anything is written.
"""

import collections

from chunkvol.errors import ChunkvolError, CorruptionError, NotFoundError, PeerError
from chunkvol.format import segment, store_pool
from chunkvol.mirror import receiver
from chunkvol.mirror.object_heal import SegmentCopies
from chunkvol.network import Network
from chunkvol.objstore.sealed_store import open_pool

# One encoded batch: its object name and bytes (data None: the store has it already), and the
# end of the origin's chain, (last sequence, digest), before and after it.
Segment = collections.namedtuple("Segment", "origin name data previous after")


class ObjectTarget:
    """A Target and a PipelinedTarget (mirror/target.py)."""

    # The shipper reads and encodes the next batch while a put is under way: measured
    # (docs/BENCH.md) 1.9x on RADOS, 1.15x on S3. Not for dir: and node: targets, where the
    # receiver is the limit and a read-ahead only made the shipper fault in fresh pages for
    # every batch.
    READ_AHEAD = True

    def __init__(self, url, source_fields, network=None, key=None):
        """`key`: the StoreKey (format/store_key.py) that seals every object, or None."""
        self.url = url
        self.pool_uuid = bytes.fromhex(source_fields["pool_uuid"])
        self.key = key
        store = (network or Network()).open_store(url)
        try:
            self.store = open_pool(store, self.pool_uuid, key, create=True)
        except BaseException:
            store.close()
            raise
        self.tails = {}  # origin -> (last sequence, digest) of its last segment here
        self._describe_pool(source_fields)

    def _describe_pool(self, fields):
        name = store_pool.object_name(self.pool_uuid)
        try:
            store_pool.decode(self.store.get(name), self.pool_uuid, f"{self.url}/{name}")
        except NotFoundError:
            self.store.put(name, store_pool.encode(fields))

    def tail(self, origin):
        """(last sequence, header digest) of the origin's last segment here, (0, 0) if none."""
        if origin not in self.tails:
            names = self.store.list(segment.origin_prefix(self.pool_uuid, origin))
            found = (0, 0)
            if names:
                last = max(names, key=lambda text: (segment.parse_name(text) or (b"", 0, 0, 0))[3])
                if segment.parse_name(last) is None:
                    raise CorruptionError("an object that is not a segment lies among the segments", last)
                header = segment.decode_header(self.store.get(last, 0, segment.HEADER_SIZE), last)
                found = (header.last_sequence, header.digest)
            self.tails[origin] = found
        return self.tails[origin]

    def have(self, origin):
        return self.tail(origin)[0]

    def send(self, origin, records):
        return self.put(self.encode(origin, records, self.tail(origin)))

    def encode(self, origin, records, previous):
        """The segment of `records`, chained to `previous` ((last sequence, digest) of the
        origin's segment before it). Touches nothing of this target's state, so the shipper
        encodes the next batch in its read-ahead thread, chained to the one being put."""
        if origin == 0:
            raise PeerError("records without an origin")
        # The store applies nothing, so it checks what a batch carries in itself (checksums,
        # origin, order, the closing COMMIT) as a node's receiver does: a broken or forged
        # batch never becomes a segment that a restore would then refuse.
        receiver.checked(origin, previous[0], records)
        data, header = segment.encode(self.pool_uuid, origin, records, previous[0], previous[1])
        if header.first_sequence <= previous[0]:
            return Segment(origin, None, None, previous, previous)  # the store has these already
        name = segment.name(self.pool_uuid, origin, header.first_sequence, header.last_sequence)
        if self.key is not None:
            data = self.store.seal(name, data)  # here, in the read-ahead thread, not in the put's
        return Segment(origin, name, data, previous, (header.last_sequence, header.digest))

    def put(self, encoded):
        """Store a segment from `encode`; returns the origin's last sequence stored here."""
        if encoded.previous != self.tail(encoded.origin):
            raise ChunkvolError(f"a segment chained to sequence {encoded.previous[0]} where the store's "
                                f"chain ends at {self.tail(encoded.origin)[0]}")
        if encoded.data is not None:
            if self.key is not None:
                self.store.put_sealed(encoded.name, encoded.data)
            else:
                self.store.put(encoded.name, encoded.data)
            self.tails[encoded.origin] = encoded.after
        return self.tails[encoded.origin][0]

    def fetch(self, volume_ids, group, ref, record_offset):
        # A fresh lookup each time (listing, headers): segments put since the last are found.
        copies = SegmentCopies(self.url, self.pool_uuid, store=self.store)
        try:
            found = copies.find(volume_ids, ref, record_offset)
        finally:
            copies.close()
        return None if found is None else found[0]

    def describe(self):
        described = {"store": self.url, "encrypted": self.key is not None}
        if self.key is not None:
            described["key_fingerprint"] = self.key.fingerprint
        return described

    def close(self):
        self.store.close()

