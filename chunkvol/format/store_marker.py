"""The marker of an encrypted pool in an object store: `chunkvol/POOL_UUID/encryption.json`
(format/checked_json.py), written before any sealed object of the pool, by the first
encrypted mirror to reach the store.

It is readable without the key, so that a restore or a mirror without the key, or with
another, is refused with a clear message naming the key it needs; and it is authenticated
with the key (an HMAC under a key derived for this purpose, format/store_key.py), so that it
cannot be forged or moved to another pool without the key.

| key             | type | meaning                                                       |
|-----------------|------|---------------------------------------------------------------|
| pool_uuid       | str  | 32 hex digits; must match the object's name                   |
| cipher          | str  | "AES-256-GCM" (format/sealed_object.py)                       |
| kdf             | str  | "HKDF-SHA256"                                                 |
| key_fingerprint | str  | 32 hex digits: which key (format/store_key.py)                |
| created         | str  | ISO-8601 UTC time it was written                              |
| mac             | str  | HMAC-SHA256 (hex) of "pool_uuid cipher kdf key_fingerprint created" |
"""

import hmac

from chunkvol.errors import CorruptionError, FormatError
from chunkvol.format import checked_json, store_key

KIND = "chunkvol-store-encryption"
VERSION = 1
CIPHER = "AES-256-GCM"
KDF = "HKDF-SHA256"
FIELDS = ("pool_uuid", "cipher", "kdf", "key_fingerprint", "created")


def object_name(pool_uuid):
    return f"chunkvol/{pool_uuid.hex()}/encryption.json"


def _signed(fields):
    return " ".join(str(fields[field]) for field in FIELDS).encode()


def encode(pool_uuid, key, created):
    fields = {"pool_uuid": pool_uuid.hex(), "cipher": CIPHER, "kdf": KDF, "key_fingerprint": key.fingerprint,
              "created": created}
    return checked_json.encode(KIND, VERSION, dict(fields, mac=key.mac(_signed(fields))))


def decode(data, pool_uuid, name):
    """The marker's fields, checked for form and for its pool (not yet for its key)."""
    fields = checked_json.decode(data, KIND, VERSION, name)
    if (fields.get("pool_uuid") != pool_uuid.hex() or fields.get("cipher") != CIPHER or fields.get("kdf") != KDF
            or not isinstance(fields.get("key_fingerprint"), str)
            or not store_key.FINGERPRINT.match(fields["key_fingerprint"])
            or not isinstance(fields.get("created"), str) or not isinstance(fields.get("mac"), str)):
        raise FormatError("encryption marker does not match its name or misses fields", name)
    return fields


def verify(fields, key, name):
    """Raise CorruptionError unless `key` (whose fingerprint the marker names) signed it."""
    if not hmac.compare_digest(fields["mac"], key.mac(_signed(fields))):
        raise CorruptionError("encryption marker fails authentication with the key it names (forged or altered)",
                              name)
