"""A mirror in an object store (`rados:...` or `s3:...`, chunkvol/objstore): every batch the
shipper sends becomes one immutable segment object (format/segment.py), chained to the
origin's previous one. Nothing is ever overwritten, so a crash between two uploads leaves a
whole chain; a batch sent again after a lost reply is stored again under the same name with
the same bytes.

What the store holds of an origin is the last segment of its chain: found by listing at the
first use, then tracked here.
"""

from chunkvol.errors import CorruptionError, NotFoundError, PeerError
from chunkvol.format import segment, store_pool
from chunkvol.objstore import open_store


class ObjectTarget:
    def __init__(self, url, source_fields):
        self.url = url
        self.pool_uuid = bytes.fromhex(source_fields["pool_uuid"])
        self.store = open_store(url)
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
        if origin == 0:
            raise PeerError("records without an origin")
        previous_sequence, previous_digest = self.tail(origin)
        data, header = segment.encode(self.pool_uuid, origin, records, previous_sequence, previous_digest)
        if header.first_sequence <= previous_sequence:
            return previous_sequence  # the store has these already
        self.store.put(segment.name(self.pool_uuid, origin, header.first_sequence, header.last_sequence), data)
        self.tails[origin] = (header.last_sequence, header.digest)
        return header.last_sequence

    def describe(self):
        return {"store": self.url}

    def close(self):
        self.store.close()
