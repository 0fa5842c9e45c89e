"""Sealed objects without a store: seal and open (format/sealed_object.py) against every kind
of hostile bytes, ranged reads through a SealedStore over a store in memory, the key file
and fingerprint (format/store_key.py), and the marker rules of objstore/sealed_store.py."""

import hashlib
import os

import pytest
from hypothesis import given, settings, strategies as st

from chunkvol import objstore
from chunkvol.errors import CorruptionError, NotFoundError, StoreKeyError
from chunkvol.format import checked_json, sealed_object, segment, store_key, store_marker, store_pool
from chunkvol.objstore.sealed_store import SealedStore, open_pool

KEY = store_key.StoreKey(bytes(range(32)))
OTHER_KEY = store_key.StoreKey(bytes(range(1, 33)))
POOL = bytes(range(16))
NAME = "chunkvol/000102030405060708090a0b0c0d0e0f/chunks/0000000000000001/0000000000000001/00000000"
SMALL_FRAMES = 64  # bytes per frame in the generated cases: many frames from little data

sizes = st.integers(min_value=0, max_value=700)
heads = st.sampled_from([0, 1, 17, 120])


class MemoryStore(objstore.ObjectStore):
    """An ObjectStore in a dict, counting the gets it answers."""
    url = "s3:http://memory/bucket"

    def __init__(self):
        self.objects = {}
        self.gets = 0

    def _raw_put(self, name, data):
        self.objects[name] = bytes(data)

    def _raw_get(self, name, offset, length):
        if name not in self.objects:
            raise objstore.missing(self.url, name)
        self.gets += 1
        data = self.objects[name]
        return data[offset:] if length is None else data[offset:offset + length]

    def _raw_size(self, name):
        return len(self.objects[name])

    def _raw_list(self, prefix):
        return [name for name in self.objects if name.startswith(prefix)]

    def _raw_delete(self, name):
        self.objects.pop(name)


def sealed(data, head_bytes=0, name=NAME, key=KEY):
    return sealed_object.seal(key, name, data, head_bytes, SMALL_FRAMES)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=700), head_bytes=heads)
def test_what_is_sealed_opens_to_the_same_bytes(data, head_bytes):
    stored = sealed(data, head_bytes)
    envelope = sealed_object.decode_envelope(stored, NAME)
    assert len(stored) == envelope.stored_bytes() == 64 + len(data) + 16 * envelope.frame_count()
    assert sealed_object.open_whole(KEY, NAME, stored) == data


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=700), head_bytes=heads)
def test_every_frame_is_what_the_one_shot_aead_makes(data, head_bytes):
    """seal() encrypts frame by frame into one buffer: each frame must be exactly
    AESGCM.encrypt(nonce, plaintext, aad), ciphertext then tag, as the layout says."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    stored = sealed(data, head_bytes)
    envelope = sealed_object.decode_envelope(stored, NAME)
    aead = AESGCM(KEY.object_key(envelope.salt))
    for index in range(envelope.frame_count()):
        start, end = envelope.frame_span(index)
        frame = stored[envelope.stored_offset(index):envelope.stored_offset(index + 1)]
        nonce = bytes(4) + index.to_bytes(8, "little")
        aad = envelope.raw + index.to_bytes(8, "little") + NAME.encode()
        assert frame == aead.encrypt(nonce, data[start:end], aad)
        assert aead.decrypt(nonce, frame, aad) == data[start:end]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=300), head_bytes=heads, where=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_flipped_bit_is_detected(data, head_bytes, where, bit):
    stored = bytearray(sealed(data, head_bytes))
    stored[where % len(stored)] ^= 1 << bit
    with pytest.raises(CorruptionError):
        sealed_object.open_whole(KEY, NAME, bytes(stored))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), head_bytes=heads, cut=st.integers(min_value=1), extra=st.binary(min_size=1, max_size=40))
def test_a_cut_or_extended_object_is_detected(data, head_bytes, cut, extra):
    stored = sealed(data, head_bytes)
    with pytest.raises(CorruptionError):
        sealed_object.open_whole(KEY, NAME, stored[:len(stored) - 1 - (cut % len(stored))])
    with pytest.raises(CorruptionError):
        sealed_object.open_whole(KEY, NAME, stored + extra)


def test_an_object_under_another_name_or_key_does_not_open():
    stored = sealed(b"x" * 200)
    with pytest.raises(CorruptionError, match="fails authentication"):
        sealed_object.open_whole(KEY, NAME.replace("00000000", "00000001"), stored)
    with pytest.raises(CorruptionError, match="another key"):
        sealed_object.open_whole(OTHER_KEY, NAME, stored)
    # Another key whose tag was forged to this key's still fails, at the tag check of AES-GCM.
    forged = bytearray(sealed(b"x" * 200, key=OTHER_KEY))
    forged[24:32] = bytes.fromhex(KEY.fingerprint[:16])
    with pytest.raises(CorruptionError, match="fails authentication"):
        sealed_object.open_whole(KEY, NAME, bytes(forged))


def test_frames_moved_within_or_between_objects_are_detected():
    data = os.urandom(4 * SMALL_FRAMES)
    stored = sealed(data)
    frame = SMALL_FRAMES + 16
    swapped = stored[:64] + stored[64 + frame:64 + 2 * frame] + stored[64:64 + frame] + stored[64 + 2 * frame:]
    with pytest.raises(CorruptionError):
        sealed_object.open_whole(KEY, NAME, swapped)
    other = sealed(data)  # the same bytes sealed again: another salt, so another key
    spliced = stored[:64 + frame] + other[64 + frame:]
    with pytest.raises(CorruptionError):
        sealed_object.open_whole(KEY, NAME, spliced)


def test_every_seal_draws_a_fresh_salt_so_no_key_and_nonce_pair_repeats():
    """The nonce rule (docs/FORMAT.md): nonces are frame numbers under a key of each object's
    own, and the same bytes sealed again (a retry, a re-upload) get another salt, so another key."""
    salts = {sealed_object.decode_envelope(sealed(b"same bytes"), NAME).salt for _ in range(200)}
    assert len(salts) == 200
    assert len({KEY.object_key(salt) for salt in salts}) == 200


def test_plaintext_where_ciphertext_is_expected_is_refused():
    with pytest.raises(CorruptionError, match="holds plaintext"):
        sealed_object.open_whole(KEY, NAME, b"CVsg" + bytes(200))


@settings(max_examples=150, deadline=None)
@given(data=st.binary(min_size=1, max_size=700), head_bytes=heads,
       reads=st.lists(st.tuples(st.integers(0, 750), st.integers(0, 300)), min_size=1, max_size=6))
def test_ranged_reads_answer_the_plaintext_range(data, head_bytes, reads):
    inner = MemoryStore()
    inner.put(NAME, sealed(data, head_bytes))
    store = SealedStore(inner, KEY)
    for offset, length in reads:
        assert store.get(NAME, offset, length) == data[offset:offset + length]
    assert store.get(NAME) == data
    assert store.size(NAME) == len(data)


def test_a_segment_header_comes_with_its_envelope_in_one_get():
    inner = MemoryStore()
    store = SealedStore(inner, KEY)
    name = segment.name(POOL, 7, 1, 9)
    data = os.urandom(segment.HEADER_SIZE + 3 * (1 << 20))
    store.put(name, data)
    assert store.get(name, 0, segment.HEADER_SIZE) == data[:segment.HEADER_SIZE] and inner.gets == 1
    # A later unit of the object: one get, its envelope known.
    assert store.get(name, segment.HEADER_SIZE + (1 << 20), 1 << 20) == data[segment.HEADER_SIZE + (1 << 20):
                                                                                 segment.HEADER_SIZE + (2 << 20)]
    assert inner.gets == 2


def test_an_object_put_again_is_read_with_its_new_envelope():
    inner = MemoryStore()
    reader, writer = SealedStore(inner, KEY), SealedStore(inner, KEY)
    writer.put(NAME, b"a" * 500)
    assert reader.get(NAME, 100, 50) == b"a" * 50
    writer.put(NAME, b"b" * 500)  # the same name again (a re-sent segment): a new salt
    assert reader.get(NAME, 100, 50) == b"b" * 50


def test_a_tampered_frame_is_never_returned_by_a_ranged_read():
    inner = MemoryStore()
    store = SealedStore(inner, KEY)
    store.put(NAME, os.urandom(3 << 20))
    stored = bytearray(inner.objects[NAME])
    envelope = sealed_object.decode_envelope(stored, NAME)
    stored[envelope.stored_offset(envelope.frame_of(1 << 20)) + 5] ^= 1  # in the second MiB's first frame
    inner.objects[NAME] = bytes(stored)
    assert len(store.get(NAME, 0, 1 << 20)) == 1 << 20
    with pytest.raises(CorruptionError):
        store.get(NAME, 1 << 20, 4096)
    inner.objects[NAME] = bytes(stored[:-20])  # cut short: the size is checked too
    with pytest.raises(CorruptionError):
        store.size(NAME)


# ---- key files and fingerprints -------------------------------------------------------------

def test_a_key_file_round_trips_and_its_fingerprint_hides_the_key():
    master = os.urandom(32)
    key = store_key.decode(store_key.encode(master))
    assert key.master == master and len(key.fingerprint) == 32
    assert key.fingerprint not in (hashlib.sha256(master).hexdigest()[:32], master.hex()[:32])
    assert master.hex() not in repr(key)
    for bad in (b"", b"chunkvol-store-key 1\n" + b"0" * 63 + b"\n", b"chunkvol-store-key 2\n" + b"0" * 64 + b"\n",
                store_key.encode(master).upper()):
        with pytest.raises(CorruptionError):
            store_key.decode(bad)


# ---- the marker: which pools are encrypted, with which key ----------------------------------

def test_open_pool_refuses_a_key_that_does_not_fit():
    inner = MemoryStore()
    sealed_store = open_pool(inner, POOL, KEY, create=True)
    assert isinstance(sealed_store, SealedStore)
    sealed_store.put(store_pool.object_name(POOL), store_pool.encode(
        {"pool_uuid": POOL.hex(), "chunk_size": 1 << 24, "created": "now"}))
    with pytest.raises(StoreKeyError, match=f"encrypted with the key {KEY.fingerprint}: give that key"):
        open_pool(inner, POOL, None)
    with pytest.raises(StoreKeyError, match=f"not with this key \\({OTHER_KEY.fingerprint}\\)"):
        open_pool(inner, POOL, OTHER_KEY)
    assert isinstance(open_pool(inner, POOL, KEY), SealedStore)

    # The marker deleted: without a key still refused, with the key the description proves it.
    marker = inner.objects.pop(store_marker.object_name(POOL))
    with pytest.raises(StoreKeyError, match="marker is missing"):
        open_pool(inner, POOL, None)
    assert isinstance(open_pool(inner, POOL, KEY), SealedStore)
    with pytest.raises(CorruptionError):
        open_pool(inner, POOL, OTHER_KEY)

    # A marker forged to name another key fails its MAC under that key.
    fields = store_marker.decode(marker, POOL, "marker")
    forged = checked_json.encode(store_marker.KIND, store_marker.VERSION, dict(fields, key_fingerprint=OTHER_KEY.fingerprint))
    inner.objects[store_marker.object_name(POOL)] = forged
    with pytest.raises(CorruptionError, match="fails authentication"):
        open_pool(inner, POOL, OTHER_KEY)


def test_an_unencrypted_pool_refuses_a_key_and_a_new_one_gets_a_marker_first():
    inner = MemoryStore()
    plain = open_pool(inner, POOL, None, create=True)
    assert plain is inner and not inner.objects
    inner.put(store_pool.object_name(POOL), b"{}")
    with pytest.raises(StoreKeyError, match="unencrypted"):
        open_pool(inner, POOL, KEY, create=True)
    other_pool = bytes(16)
    open_pool(inner, other_pool, KEY, create=True)
    assert store_marker.object_name(other_pool) in inner.objects
    with pytest.raises(NotFoundError):
        inner.get(store_pool.object_name(other_pool))
