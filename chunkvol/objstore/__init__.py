"""Object stores that hold a pool's log away from its machine: Ceph RADOS and any S3 API.

A store is named by a URL:
- `rados:CEPH_CONF:RADOS_POOL`: python3-rados with the cluster's config file (the keyring is
  found through it, as for the `rados` command);
- `s3:ENDPOINT_URL/BUCKET`: boto3 with the usual AWS credentials (environment, profile).

Both offer the same five calls on immutable objects (store.py): put, get (a byte range), size,
list (names under a prefix, in name order) and delete. Transient faults (connection refused,
timeouts, throttling, 5xx) are retried with exponential backoff and jitter for up to
RETRY_SECONDS (CHUNKVOL_STORE_RETRY_SECONDS, default 20), then raised as UnreachableError; refused credentials raise AccessDeniedError
at once; a missing object raises NotFoundError. The callers (the shipper, restore, the read
of an evicted chunk) run outside the write path, so a slow store never slows local writes.
"""

import re

from chunkvol.errors import UsageError
from chunkvol.objstore.rados_store import RadosStore
from chunkvol.objstore.s3_store import S3Store
from chunkvol.objstore.store import RETRY_SECONDS, ObjectStore, TransientError, denied, missing

__all__ = ["RETRY_SECONDS", "ObjectStore", "TransientError", "denied", "missing", "parse_url", "open_store"]
URL = re.compile(r"^(rados:(?P<conf>/[^:]+):(?P<pool>[^:/\s]+)|s3:(?P<endpoint>https?://[^/\s]+(/[^\s]*)?)/(?P<bucket>[a-z0-9][a-z0-9.-]{1,62}))$")


def parse_url(text):
    """("rados", conf, pool) or ("s3", endpoint, bucket); UsageError otherwise."""
    match = URL.match(text) if isinstance(text, str) else None
    if match is None:
        raise UsageError(f"object store {text!r}: use rados:/path/to/ceph.conf:RADOS_POOL or "
                         "s3:http(s)://HOST[:PORT]/BUCKET")
    if match.group("conf"):
        return "rados", match.group("conf"), match.group("pool")
    return "s3", match.group("endpoint"), match.group("bucket")


def open_store(text, retry_seconds=None):
    """The store named by `text`; `retry_seconds`: how long its faults may last for this
    caller (RETRY_SECONDS unless given; a client's read waits on it, a shipper need not)."""
    parsed = parse_url(text)
    if parsed[0] == "rados":
        store = RadosStore(text, parsed[1], parsed[2])
    else:
        store = S3Store(text, parsed[1], parsed[2])
    if retry_seconds is not None:
        store.retry_seconds = retry_seconds
    return store
