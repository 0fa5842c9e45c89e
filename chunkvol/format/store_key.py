"""A mirror's encryption key (`chunkvol key generate PATH`) and the keys derived from it.

The key file is two lines of ASCII, so that it can be printed and typed back:

    chunkvol-store-key 1
    <64 lower-case hex digits: the 256-bit master key>

The master key is never used directly. Every use has its own key, derived with HKDF-SHA256
(RFC 5869) from the master key and a label saying what it is for (`info`):

| info                              | salt                  | used for                              |
|-----------------------------------|-----------------------|---------------------------------------|
| b"chunkvol sealed object v1"      | the object's 32-byte salt | AES-256-GCM key of one object (format/sealed_object.py) |
| b"chunkvol store marker v1"       | none                  | HMAC-SHA256 of the store's marker (format/store_marker.py) |
| b"chunkvol key fingerprint v1"    | none                  | the fingerprint (below)               |

The fingerprint names a key without revealing it: the first 16 bytes of SHA-256 of the
derived fingerprint key, as 32 hex digits. It is one-way twice over (HKDF, then a hash), and
it is all that mirrors.json, the store's marker and `mirror list` ever hold of a key.
"""

import hashlib
import hmac
import re

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from chunkvol.errors import FormatError

KEY_BYTES = 32
SALT_BYTES = 32
FINGERPRINT_HEX = 32
HEADER_LINE = "chunkvol-store-key 1"
FILE = re.compile(r"^chunkvol-store-key 1\n([0-9a-f]{64})\n$")
FINGERPRINT = re.compile(r"^[0-9a-f]{32}$")
OBJECT_INFO = b"chunkvol sealed object v1"
MARKER_INFO = b"chunkvol store marker v1"
FINGERPRINT_INFO = b"chunkvol key fingerprint v1"


def derive(master, info, salt=None):
    """A 32-byte key for one purpose (`info`), and one object (`salt`) where given."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(master)


class StoreKey:
    """A master key loaded from its file, with what is derived from it once."""

    __slots__ = ("master", "fingerprint", "marker_key", "path")

    def __init__(self, master, path=None):
        assert len(master) == KEY_BYTES
        self.master = master
        self.path = path
        self.fingerprint = hashlib.sha256(derive(master, FINGERPRINT_INFO)).hexdigest()[:FINGERPRINT_HEX]
        self.marker_key = derive(master, MARKER_INFO)

    def object_key(self, salt):
        """The AES-256-GCM key of the object whose salt is `salt`."""
        return derive(self.master, OBJECT_INFO, salt)

    def mac(self, data):
        """HMAC-SHA256 (hex) of `data` under the marker key."""
        return hmac.new(self.marker_key, data, hashlib.sha256).hexdigest()

    def __repr__(self):  # never the key itself, in a traceback or a log
        return f"StoreKey(fingerprint={self.fingerprint})"


def encode(master):
    assert len(master) == KEY_BYTES
    return f"{HEADER_LINE}\n{master.hex()}\n".encode()


def decode(data, path=None):
    """The StoreKey of a key file's bytes; FormatError for anything else."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    match = FILE.match(text)
    if match is None:
        raise FormatError("not a chunkvol key file (`chunkvol key generate PATH` makes one)", path)
    return StoreKey(bytes.fromhex(match.group(1)), path)
