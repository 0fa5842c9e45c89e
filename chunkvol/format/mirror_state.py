"""A mirror's durable cursor and figures: `POOL/mirrors/NAME.state` (format/checked_json.py),
written by its shipper after every batch the mirror acknowledged (after it synced them).

| key              | type        | meaning                                                  |
|------------------|-------------|----------------------------------------------------------|
| cursor           | int         | log address after the last batch acknowledged            |
| shipped_sequence | int         | greatest own sequence the mirror has                     |
| shipped_records  | int         | records shipped so far                                   |
| shipped_bytes    | int         | bytes of records shipped so far                          |
| rate             | float       | bytes per second while shipping (moving average)         |
| updated          | float       | Unix time of this write                                  |
| state            | str         | "shipping", "idle" (caught up) or "error"                |
| last_error       | str or null | the last failure, with its time                          |
| last_error_kind  | str or null | its class in chunkvol/errors.py (optional: absent in older files), so a `mirror sync` following a server's shipper fails as the shipper did |

The cursor only moves forward over records the mirror has synced; if a write of this file is
lost, the shipper starts from the older cursor and the mirror skips what it already holds.
"""

from chunkvol.errors import FormatError
from chunkvol.format import checked_json

KIND = "chunkvol-mirror-state"
VERSION = 1
FIELDS = {"cursor": int, "shipped_sequence": int, "shipped_records": int, "shipped_bytes": int,
          "rate": (int, float), "updated": (int, float), "state": str}


def initial(cursor):
    return {"cursor": cursor, "shipped_sequence": 0, "shipped_records": 0, "shipped_bytes": 0, "rate": 0.0,
            "updated": 0.0, "state": "idle", "last_error": None}


def encode(state):
    return checked_json.encode(KIND, VERSION, state)


def decode(data, path=None):
    state = checked_json.decode(data, KIND, VERSION, path)
    for key, kind in FIELDS.items():
        if not isinstance(state.get(key), kind):
            raise FormatError(f"mirror state field {key!r} missing or of the wrong type", path)
    return state
