"""A pool's tiering policy: `POOL/tiering.json` (format/checked_json.py), written by
`chunk policy`, read by the shipper process of `serve` after each shipping pass.

| key        | type        | meaning                                                        |
|------------|-------------|----------------------------------------------------------------|
| keep_under | int         | evict the oldest eligible chunks while local chunk bytes exceed this |
| mirror     | str or null | the object-store mirror to evict to (null: the only one)       |
| updated    | float       | Unix time of this write                                        |
"""

from chunkvol.errors import FormatError
from chunkvol.format import checked_json

KIND = "chunkvol-tiering-policy"
VERSION = 1


def encode(policy):
    return checked_json.encode(KIND, VERSION, policy)


def decode(data, path=None):
    policy = checked_json.decode(data, KIND, VERSION, path)
    if not isinstance(policy.get("keep_under"), int) or policy["keep_under"] < 0 \
            or not (policy.get("mirror") is None or isinstance(policy["mirror"], str)):
        raise FormatError("tiering policy fields missing or of the wrong type", path)
    return policy
