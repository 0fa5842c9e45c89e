"""A sealed object: what an encrypted object-store mirror stores in place of an object's
plaintext (segments, the pool's description, pieces of evicted chunks).

Layout: an envelope, then the plaintext cut into frames, each sealed alone with AES-256-GCM
(ciphertext, then its 16-byte tag), so that a ranged read (a segment's header, one 1 MiB unit
of an evicted chunk) fetches and opens only the frames it covers.

Envelope, little-endian (64 bytes):

| offset | size | type | field           | meaning                                                 |
|-------:|-----:|------|-----------------|---------------------------------------------------------|
|      0 |    4 | 4s   | magic           | b"CVsx"                                                 |
|      4 |    1 | u8   | version         | 1                                                       |
|      5 |    1 | u8   | cipher          | 1: AES-256-GCM                                          |
|      6 |    2 | -    | reserved        | 0                                                       |
|      8 |    4 | u32  | head_bytes      | plaintext bytes of frame 0 when it is a short head (0: none) |
|     12 |    4 | u32  | frame_bytes     | plaintext bytes of every other frame (the last may be shorter) |
|     16 |    8 | u64  | plaintext_bytes | bytes of the whole plaintext                            |
|     24 |    8 | 8s   | key_tag         | the first 8 bytes of the key's fingerprint (format/store_key.py) |
|     32 |   32 | 32s  | salt            | random, new for every object written                    |

Frames: with head_bytes h > 0, frame 0 is plaintext [0, h) (a segment's 120-byte header, read
alone by restore and heal), then frames of frame_bytes; with h = 0, frames of frame_bytes from
the start. There is always at least one frame (an empty plaintext is one empty frame: its tag).

Frame i (0-based) is `AES-256-GCM(key, nonce, plaintext_i, aad)` with
- key   = HKDF-SHA256(master key, salt, info "chunkvol sealed object v1"): one key per object;
- nonce = 4 zero bytes | u64 i (little-endian);
- aad   = the 64 envelope bytes | u64 i | the object's name (UTF-8).

The nonce rule: a (key, nonce) pair is never used twice because the key is never used for
two objects. Every put of an object, the first and any retry, re-upload or upload from
another node or a restored pool, draws a fresh 256-bit salt from the OS (os.urandom), so the
per-object key repeats only if two salts collide (probability 2^-128 after 2^64 objects);
within one object the frame index makes every nonce distinct. No counter is kept anywhere,
so nodes need no coordination and a crash cannot roll one back.

What the associated data binds: the name (which holds the pool uuid, the node, the sequence
range or chunk and piece, as the unencrypted store's names do), the frame's place, the
plaintext length and the salt. An object moved to another name, a frame moved within it or
taken from another object, an object cut short or extended, or an envelope altered fails
authentication; the checks of the plaintext formats (segment chains and headers) then run as
they do unencrypted, so a stale or replayed object is caught as before.
"""

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from chunkvol.errors import CorruptionError, FormatError

MAGIC = b"CVsx"
VERSION = 1
CIPHER_AES_256_GCM = 1
ENVELOPE = struct.Struct("<4sBB2xIIQ8s32s")
ENVELOPE_BYTES = ENVELOPE.size
assert ENVELOPE_BYTES == 64
TAG_BYTES = 16
# 1 MiB: a unit of an evicted chunk is one frame, so a cold read fetches and opens just its
# unit. Each frame costs a cipher context in Python (~20-40 us): 8 MiB took 12 ms of CPU to seal
# in 64 KiB frames and 2.3 ms in 1 MiB ones (frames go straight into one buffer, see seal()).
FRAME_BYTES = 1 << 20
NONCE_PREFIX = bytes(4)
INDEX = struct.Struct("<Q")


class Envelope:
    __slots__ = ("raw", "head_bytes", "frame_bytes", "plaintext_bytes", "key_tag", "salt")

    def __init__(self, raw, head_bytes, frame_bytes, plaintext_bytes, key_tag, salt):
        self.raw = raw
        self.head_bytes = head_bytes
        self.frame_bytes = frame_bytes
        self.plaintext_bytes = plaintext_bytes
        self.key_tag = key_tag
        self.salt = salt

    def frame_count(self):
        """At least one: an empty object is a lone tag, so it cannot be forged either."""
        if self.plaintext_bytes <= self.head_bytes:
            return 1
        rest = self.plaintext_bytes - self.head_bytes
        return (1 if self.head_bytes else 0) + -(-rest // self.frame_bytes)

    def frame_span(self, index):
        """(plaintext start, plaintext end) of frame `index`."""
        if self.head_bytes:
            if index == 0:
                return 0, min(self.head_bytes, self.plaintext_bytes)
            start = self.head_bytes + (index - 1) * self.frame_bytes
        else:
            start = index * self.frame_bytes
        start = min(start, self.plaintext_bytes)  # the frame after the last begins at the end
        return start, min(start + self.frame_bytes, self.plaintext_bytes)

    def frame_of(self, offset):
        """The index of the frame holding plaintext byte `offset`."""
        if self.head_bytes:
            return 0 if offset < self.head_bytes else 1 + (offset - self.head_bytes) // self.frame_bytes
        return offset // self.frame_bytes

    def stored_offset(self, index):
        """Where frame `index` begins in the stored object."""
        start, _ = self.frame_span(index)
        return ENVELOPE_BYTES + start + index * TAG_BYTES

    def stored_bytes(self):
        return ENVELOPE_BYTES + self.plaintext_bytes + self.frame_count() * TAG_BYTES


def _aad(envelope, index, name):
    return envelope.raw + INDEX.pack(index) + name.encode()


def _nonce(index):
    return NONCE_PREFIX + INDEX.pack(index)


def seal(key, name, data, head_bytes=0, frame_bytes=FRAME_BYTES):
    """The stored bytes of `data` under object name `name`, sealed with StoreKey `key`."""
    assert 0 <= head_bytes < 1 << 32 and 0 < frame_bytes < 1 << 32
    data = memoryview(data).cast("B")
    salt = os.urandom(32)
    raw = ENVELOPE.pack(MAGIC, VERSION, CIPHER_AES_256_GCM, head_bytes, frame_bytes, len(data),
                        bytes.fromhex(key.fingerprint[:16]), salt)
    envelope = Envelope(raw, head_bytes, frame_bytes, len(data), raw[24:32], salt)
    # AES-256-GCM frame by frame straight into one buffer (the AESGCM class returns a new
    # bytes per frame, then a join copies them all again: a third of the time on 8 MiB).
    # The bytes are AESGCM.encrypt's (ciphertext, then the tag), tests/objstore check it.
    stored = bytearray(envelope.stored_bytes())
    stored[:ENVELOPE_BYTES] = raw
    out = memoryview(stored)
    algorithm = algorithms.AES(key.object_key(salt))
    for index in range(envelope.frame_count()):
        start, end = envelope.frame_span(index)
        at = envelope.stored_offset(index)
        encryptor = Cipher(algorithm, modes.GCM(_nonce(index))).encryptor()
        encryptor.authenticate_additional_data(_aad(envelope, index, name))
        # update_into wants room for a block beyond the data: the tag's slot, written next
        encryptor.update_into(data[start:end], out[at:at + end - start + TAG_BYTES])
        encryptor.finalize()
        out[at + end - start:at + end - start + TAG_BYTES] = encryptor.tag
    return bytes(stored)


def is_sealed(data):
    """Whether `data` (an object's first bytes) begins like a sealed object."""
    return bytes(data[:4]) == MAGIC


def decode_envelope(data, name):
    """The Envelope at the start of `data` (a stored object's first bytes), checked for form;
    only opening a frame proves it genuine."""
    if len(data) < ENVELOPE_BYTES:
        raise CorruptionError(f"sealed object cut short ({len(data)} bytes)", name)
    raw = bytes(data[:ENVELOPE_BYTES])
    magic, version, cipher, head_bytes, frame_bytes, plaintext_bytes, key_tag, salt = ENVELOPE.unpack(raw)
    if magic != MAGIC:
        raise FormatError("not a sealed object: the store holds plaintext where this mirror's key "
                          "expects ciphertext", name)
    if version != VERSION or cipher != CIPHER_AES_256_GCM:
        raise FormatError(f"unknown sealed object version {version} or cipher {cipher}", name)
    if frame_bytes == 0:
        raise CorruptionError("sealed object envelope fields are out of range", name)
    return Envelope(raw, head_bytes, frame_bytes, plaintext_bytes, key_tag, salt)


class Opener:
    """Opens the frames of one stored object with one key (its per-object key derived once)."""

    def __init__(self, key, name, envelope):
        if envelope.key_tag != bytes.fromhex(key.fingerprint[:16]):
            raise CorruptionError(f"sealed with another key (tag {envelope.key_tag.hex()}, this key's "
                                  f"fingerprint {key.fingerprint})", name)
        self.name = name
        self.envelope = envelope
        self.algorithm = algorithms.AES(key.object_key(envelope.salt))

    def open(self, stored, first, last):
        """The plaintext of frames first..last (inclusive) from `stored`, their stored bytes."""
        envelope = self.envelope
        base = envelope.stored_offset(first)
        if len(stored) != envelope.stored_offset(last + 1) - base:
            raise CorruptionError(f"sealed object cut short: frames {first}..{last} take "
                                  f"{envelope.stored_offset(last + 1) - base} bytes, {len(stored)} came", self.name)
        view = memoryview(stored)
        plain_start = envelope.frame_span(first)[0]
        plaintext = bytearray(envelope.frame_span(last)[1] - plain_start + TAG_BYTES)  # + update_into's slack
        out = memoryview(plaintext)
        for index in range(first, last + 1):
            start = envelope.stored_offset(index) - base
            end = envelope.stored_offset(index + 1) - base - TAG_BYTES
            at = envelope.frame_span(index)[0] - plain_start
            decryptor = Cipher(self.algorithm, modes.GCM(_nonce(index), bytes(view[end:end + TAG_BYTES]))).decryptor()
            decryptor.authenticate_additional_data(_aad(envelope, index, self.name))
            decryptor.update_into(view[start:end], out[at:at + end - start + TAG_BYTES])
            try:
                decryptor.finalize()  # checks the tag: nothing of an unchecked frame is returned
            except InvalidTag:
                raise CorruptionError(f"sealed object frame {index} fails authentication (altered, moved, "
                                      "cut or written under another name)", self.name) from None
        del out
        del plaintext[len(plaintext) - TAG_BYTES:]
        return bytes(plaintext)


def open_whole(key, name, stored):
    """The plaintext of a whole stored object."""
    envelope = decode_envelope(stored, name)
    if len(stored) != envelope.stored_bytes():
        raise CorruptionError(f"sealed object is {len(stored)} bytes, its envelope says "
                              f"{envelope.stored_bytes()}", name)
    return Opener(key, name, envelope).open(memoryview(stored)[ENVELOPE_BYTES:], 0, envelope.frame_count() - 1)
