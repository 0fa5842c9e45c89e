"""Object stores that hold a pool's log away from its machine: Ceph RADOS and any S3 API.

A store is named by a URL:
- `rados:CEPH_CONF:RADOS_POOL`: python3-rados with the cluster's config file (the keyring is
  found through it, as for the `rados` command);
- `s3:ENDPOINT_URL/BUCKET`: boto3 with the usual AWS credentials (environment, profile).

Both offer the same five calls on immutable objects: put, get (a byte range), size, list
(names under a prefix, in name order) and delete. Transient faults (connection refused,
timeouts, throttling, 5xx) are retried with exponential backoff and jitter for up to
RETRY_SECONDS (CHUNKVOL_STORE_RETRY_SECONDS, default 20), then raised as UnreachableError; refused credentials raise AccessDeniedError
at once; a missing object raises NotFoundError. The callers (the shipper, restore, the read
of an evicted chunk) run outside the write path, so a slow store never slows local writes.
"""

import os
import random
import re
import time

from chunkvol.errors import AccessDeniedError, NotFoundError, UnreachableError, UsageError

RETRY_SECONDS = float(os.environ.get("CHUNKVOL_STORE_RETRY_SECONDS", "20"))  # how long a fault may last
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 4.0
URL = re.compile(r"^(rados:(?P<conf>/[^:]+):(?P<pool>[^:/\s]+)|s3:(?P<endpoint>https?://[^/\s]+(/[^\s]*)?)/(?P<bucket>[a-z0-9][a-z0-9.-]{1,62}))$")


class TransientError(Exception):
    """Raised by a backend for a fault worth retrying (never leaves this package)."""


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
        from chunkvol.objstore.rados_store import RadosStore
        store = RadosStore(text, parsed[1], parsed[2])
    else:
        from chunkvol.objstore.s3_store import S3Store
        store = S3Store(text, parsed[1], parsed[2])
    if retry_seconds is not None:
        store.retry_seconds = retry_seconds
    return store


class ObjectStore:
    """What both backends share: the retry loop. A backend implements the _raw_* calls and
    raises TransientError, AccessDeniedError or NotFoundError."""

    url = None
    retry_seconds = None  # RETRY_SECONDS unless open_store was given another

    def _retry(self, what, call, *args):
        patience = RETRY_SECONDS if self.retry_seconds is None else self.retry_seconds
        deadline = time.monotonic() + patience
        backoff = FIRST_BACKOFF
        while True:
            try:
                return call(*args)
            except TransientError as error:
                if time.monotonic() + backoff > deadline:
                    raise UnreachableError(f"{self.url}: {what}: {error} (retried for {patience:.0f} s)") from None
                time.sleep(backoff * (0.5 + random.random()))
                backoff = min(MAX_BACKOFF, backoff * 2)

    def put(self, name, data):
        """Store `data` whole under `name` (an object is written whole or not at all)."""
        self._retry(f"put {name}", self._raw_put, name, data)

    def get(self, name, offset=0, length=None):
        """The object's bytes from `offset` (all of them, or `length`)."""
        return self._retry(f"get {name}", self._raw_get, name, offset, length)

    def size(self, name):
        return self._retry(f"stat {name}", self._raw_size, name)

    def list(self, prefix):
        """The names of the objects that start with `prefix`, in name order."""
        return sorted(self._retry(f"list {prefix}", self._raw_list, prefix))

    def delete(self, name):
        try:
            self._retry(f"delete {name}", self._raw_delete, name)
        except NotFoundError:
            pass

    def close(self):
        pass


def denied(url, what, error):
    return AccessDeniedError(f"{url}: {what}: access denied ({error}); check the credentials or keyring")


def missing(url, name):
    return NotFoundError(f"{url}: no object {name}")
