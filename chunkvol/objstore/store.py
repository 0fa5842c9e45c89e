"""What every object store backend shares (rados_store.py, s3_store.py): the calls on
immutable objects, the retry loop around them, and the errors a backend raises.

A backend implements the `_raw_*` calls and raises TransientError for a fault worth retrying,
AccessDeniedError (`denied`) or NotFoundError (`missing`). Transient faults are retried with
exponential backoff and jitter for up to RETRY_SECONDS (CHUNKVOL_STORE_RETRY_SECONDS, default
20), or the store's own `retry_seconds`, then raised as UnreachableError.
"""

import abc
import os
import random
import time

from chunkvol.errors import AccessDeniedError, NotFoundError, UnreachableError

RETRY_SECONDS = float(os.environ.get("CHUNKVOL_STORE_RETRY_SECONDS", "20"))  # how long a fault may last
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 4.0


class TransientError(Exception):
    """Raised by a backend for a fault worth retrying (never leaves this package)."""


class ObjectStore(abc.ABC):
    """The five calls, each retried; a backend implements the _raw_* calls (abstract: a
    backend missing one cannot be made at all, rather than failing at its first call)."""

    url = None
    retry_seconds = None  # RETRY_SECONDS unless open_store was given another

    @abc.abstractmethod
    def _raw_put(self, name, data):
        """Write the object whole."""

    @abc.abstractmethod
    def _raw_get(self, name, offset, length):
        """Bytes [offset, +length) of the object; length None: to its end. NotFoundError
        (`missing`) if there is none, as for _raw_size and _raw_delete."""

    @abc.abstractmethod
    def _raw_size(self, name):
        """The object's size in bytes."""

    @abc.abstractmethod
    def _raw_list(self, prefix):
        """The names that begin with `prefix`, in any order."""

    @abc.abstractmethod
    def _raw_delete(self, name):
        """Remove the object; NotFoundError (`missing`) if there is none."""

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
