"""An encrypted pool in an object store: every object of the pool is sealed
(format/sealed_object.py) on its way in and opened and authenticated on its way out, so the
store sees only ciphertext and any change it makes is detected, never returned.

`open_pool` is the one door: it reads the pool's marker (format/store_marker.py) and answers
the store to use for that pool, the plain one for an unencrypted pool or a SealedStore for an
encrypted one, refusing with StoreKeyError a key that does not fit (none for an encrypted
pool, another key, a key for a pool stored in plaintext) before anything is read or written.

A SealedStore offers the five calls of ObjectStore with plaintext names, offsets and sizes.
Names are the store's own (they hold pool uuids, node ids, sequences and chunk numbers, no
volume name), so listing and restore work unchanged. A ranged read fetches the frames it
covers; the envelope of an object (its salt) is read once and kept (ENVELOPES of them), so a
read of one unit of an evicted chunk costs one request after the first of its piece. An
object put again under its name (a segment re-sent after a lost reply) has a new salt: a
kept envelope that no longer opens is read again once.
"""

import threading
import time

from chunkvol.errors import CorruptionError, NotFoundError, StoreKeyError
from chunkvol.format import sealed_object, segment, store_marker, store_pool

ENVELOPES = 4096  # envelopes kept per store (64 bytes each)


class SealedStore:
    """An ObjectStore whose objects are sealed with a StoreKey."""

    def __init__(self, store, key):
        self.store = store
        self.key = key
        self.url = store.url
        self.envelopes = {}
        self.lock = threading.Lock()

    @staticmethod
    def head_bytes(name):
        """A segment's header is a frame of its own: restore and heal read it alone."""
        return segment.HEADER_SIZE if segment.parse_name(name) is not None else 0

    def seal(self, name, data):
        """The bytes `put` would store for `data` under `name` (fresh salt each call): the
        shipper seals the next segment in its read-ahead thread, while one is being put."""
        return sealed_object.seal(self.key, name, data, self.head_bytes(name))

    def put_sealed(self, name, stored):
        """Store bytes made by `seal` for this `name`."""
        self.store.put(name, stored)
        with self.lock:
            self.envelopes.pop(name, None)

    def put(self, name, data):
        self.put_sealed(name, self.seal(name, data))

    def get(self, name, offset=0, length=None):
        """Plaintext bytes [offset, +length) of the object (to its end when length is None);
        CorruptionError when what the store answers does not open."""
        if length is None:
            return sealed_object.open_whole(self.key, name, self.store.get(name))
        with self.lock:
            known = self.envelopes.get(name)
        try:
            return self._ranged(name, offset, length, known)
        except CorruptionError:
            if known is None:
                raise
            with self.lock:
                self.envelopes.pop(name, None)
            return self._ranged(name, offset, length, None)  # put again since: its new envelope

    def _ranged(self, name, offset, length, envelope):
        prefix = b""
        if envelope is None:
            # A read from the start (a segment's header) gets its frame with the envelope.
            wanted = sealed_object.ENVELOPE_BYTES + (length + sealed_object.TAG_BYTES if offset == 0 else 0)
            prefix = self.store.get(name, 0, wanted)
            envelope = sealed_object.decode_envelope(prefix, name)
        opener = sealed_object.Opener(self.key, name, envelope)
        end = min(offset + length, envelope.plaintext_bytes)
        if offset >= end:
            return b""
        first, last = envelope.frame_of(offset), envelope.frame_of(end - 1)
        start_stored, end_stored = envelope.stored_offset(first), envelope.stored_offset(last + 1)
        if len(prefix) >= end_stored:
            stored = memoryview(prefix)[start_stored:end_stored]
        else:
            stored = self.store.get(name, start_stored, end_stored - start_stored)
        plain = opener.open(stored, first, last)
        with self.lock:
            if len(self.envelopes) >= ENVELOPES:
                self.envelopes.clear()
            self.envelopes[name] = envelope
        skip = offset - envelope.frame_span(first)[0]
        return plain[skip:skip + end - offset] if skip or len(plain) != end - offset else plain

    def size(self, name):
        """The plaintext size, once the stored object is checked to be as long as its envelope says."""
        envelope = sealed_object.decode_envelope(self.store.get(name, 0, sealed_object.ENVELOPE_BYTES), name)
        stored = self.store.size(name)
        if stored != envelope.stored_bytes():
            raise CorruptionError(f"sealed object is {stored} bytes, its envelope says {envelope.stored_bytes()}",
                                  name)
        return envelope.plaintext_bytes

    def list(self, prefix):
        return self.store.list(prefix)

    def delete(self, name):
        with self.lock:
            self.envelopes.pop(name, None)
        self.store.delete(name)

    def close(self):
        with self.lock:
            self.envelopes.clear()
        self.store.close()


def marker_of(store, pool_uuid):
    """The fields of the pool's encryption marker in `store`, or None when it has none."""
    name = store_marker.object_name(pool_uuid)
    try:
        data = store.get(name)
    except NotFoundError:
        return None
    return store_marker.decode(data, pool_uuid, f"{store.url}/{name}")


def open_pool(store, pool_uuid, key, create=False):
    """`store` as pool `pool_uuid`'s objects are to be read and written: itself (no key, an
    unencrypted pool) or a SealedStore (with `key`). `create`: a mirror's first use, which
    writes the marker where the pool is not in the store yet."""
    uuid = pool_uuid.hex()
    marker = marker_of(store, pool_uuid)
    if marker is not None:
        if key is None:
            raise StoreKeyError(f"{store.url} holds pool {uuid} encrypted with the key {marker['key_fingerprint']}: "
                                "give that key (--key PATH)")
        if marker["key_fingerprint"] != key.fingerprint:
            raise StoreKeyError(f"{store.url} holds pool {uuid} encrypted with the key {marker['key_fingerprint']}, "
                                f"not with {key.path or 'this key'} ({key.fingerprint})")
        store_marker.verify(marker, key, f"{store.url}/{store_marker.object_name(pool_uuid)}")
        return SealedStore(store, key)
    description = store_pool.object_name(pool_uuid)
    try:
        head = store.get(description, 0, sealed_object.ENVELOPE_BYTES)
    except NotFoundError:
        head = None
    sealed = head is not None and sealed_object.is_sealed(head)
    if key is None:
        if sealed:
            raise StoreKeyError(f"{store.url} holds pool {uuid} encrypted (its marker is missing): give its key "
                                "(--key PATH)")
        return store
    if head is not None and not sealed:
        raise StoreKeyError(f"{store.url} holds pool {uuid} unencrypted: a key cannot open it, nor may an "
                            "encrypted mirror continue it (no --key, or another store)")
    sealed_store = SealedStore(store, key)
    if sealed:
        sealed_store.get(description)  # the marker was lost: the description still proves the key
    if create:
        # Before any sealed object: a reader without the key learns from it why it cannot read.
        store.put(store_marker.object_name(pool_uuid),
                  store_marker.encode(pool_uuid, key, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    return sealed_store
