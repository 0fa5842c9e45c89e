"""A pool's description in an object store: `chunkvol/POOL_UUID/pool.json`
(format/checked_json.py), written by the first shipper to reach the store and read by
`restore` to create the pool again.

| key        | type | meaning                                               |
|------------|------|-------------------------------------------------------|
| pool_uuid  | str  | 32 hex digits; must match the object's name           |
| chunk_size | int  | the pool's chunk capacity                             |
| created    | str  | ISO-8601 UTC time the pool was created                |
"""

from chunkvol.errors import FormatError
from chunkvol.format import checked_json

KIND = "chunkvol-store-pool"
VERSION = 1


def object_name(pool_uuid):
    return f"chunkvol/{pool_uuid.hex()}/pool.json"


def encode(fields):
    return checked_json.encode(KIND, VERSION, {"pool_uuid": fields["pool_uuid"], "chunk_size": fields["chunk_size"],
                                               "created": fields["created"]})


def decode(data, pool_uuid, name):
    fields = checked_json.decode(data, KIND, VERSION, name)
    if fields.get("pool_uuid") != pool_uuid.hex() or not isinstance(fields.get("chunk_size"), int) \
            or not isinstance(fields.get("created"), str):
        raise FormatError("pool description does not match its name or misses fields", name)
    return fields
