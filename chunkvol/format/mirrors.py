"""Mirror definitions: `POOL/mirrors.json` (format/checked_json.py), written by `mirror add`
and `mirror remove`, read by the shippers (which pick up changes while running).

| key      | type   | meaning                                                             |
|----------|--------|---------------------------------------------------------------------|
| mirrors  | object | name -> definition                                                  |

A definition:

| key       | type        | meaning                                                        |
|-----------|-------------|----------------------------------------------------------------|
| to        | str         | `dir:/absolute/path` (a pool on another disk), `node:HOST:PORT`, `rados:CONF:POOL` or `s3:URL/BUCKET` (an object store) |
| bandwidth | int or null | bytes per second the shipper may send (null: no limit)         |
| added     | str         | ISO-8601 UTC time of `mirror add`                              |
| peer      | bool        | optional: a peer (`peer add`), a node that writes too           |
| node      | int         | optional, with peer: the peer's node id (learned when it was added) |
| key       | str         | optional, object stores: absolute path of the key file (`mirror add --key`); never the key |
| key_fingerprint | str   | with key: the key's fingerprint (format/store_key.py), checked each time the file is read |
"""

import re

from chunkvol.errors import FormatError
from chunkvol.format import checked_json, store_key

KIND = "chunkvol-mirrors"
VERSION = 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
TARGET = re.compile(r"^(dir:/.+|node:[^:\s]+:[0-9]{1,5}|rados:/[^:]+:\S+|s3:https?://\S+)$")


def encode(mirrors):
    return checked_json.encode(KIND, VERSION, {"mirrors": mirrors})


def decode(data, path=None):
    fields = checked_json.decode(data, KIND, VERSION, path)
    mirrors = fields.get("mirrors")
    if not isinstance(mirrors, dict):
        raise FormatError("mirrors.json has no 'mirrors' object", path)
    for name, definition in mirrors.items():
        if (not NAME.match(name) or not isinstance(definition, dict)
                or not isinstance(definition.get("to"), str) or not TARGET.match(definition["to"])
                or not (definition.get("bandwidth") is None or isinstance(definition["bandwidth"], int))
                or not _key_fields_valid(definition)):
            raise FormatError(f"mirrors.json: malformed mirror {name!r}", path)
    return mirrors


def _key_fields_valid(definition):
    if "key" not in definition:
        return "key_fingerprint" not in definition
    return (isinstance(definition["key"], str) and definition["key"].startswith("/")
            and definition["to"].startswith(("rados:", "s3:"))
            and isinstance(definition.get("key_fingerprint"), str)
            and store_key.FINGERPRINT.match(definition["key_fingerprint"]) is not None)
