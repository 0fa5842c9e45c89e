"""One error hierarchy for chunkvol.

Errors become errno values only in the nbdkit plugin (nbdkit_plugin/chunkvol_plugin.py) and
exit codes only in the CLI (chunkvol/cli/main.py). Every message is one line a user can act on.
"""


class ChunkvolError(Exception):
    """Base of every error chunkvol raises on purpose."""


class UsageError(ChunkvolError):
    """Bad arguments: a malformed size, name or option."""


class NotFoundError(ChunkvolError):
    """A pool, volume or chunk that does not exist."""


class AlreadyExistsError(ChunkvolError):
    """Creating something that is already there."""


class PoolBusyError(ChunkvolError):
    """Another process holds the pool open for writing."""


class ReadOnlyError(ChunkvolError):
    """A write to a read-only pool, export or volume."""


class OutOfRangeError(ChunkvolError):
    """A request beyond the end of a volume, or a shrinking resize."""


class OutOfSpaceError(ChunkvolError):
    """The disk holding the chunks is full; nothing already flushed is lost."""


class DeviceFailedError(ChunkvolError):
    """The disk under the log failed a write or a sync. After a failed fsync the page cache can
    no longer be trusted (pages are marked clean though not on disk), so the pool refuses every
    further write and flush until it is reopened and recovers from what is really on disk."""


class CorruptionError(ChunkvolError):
    """Bytes on disk that fail their checksum or their format rules.

    Carries the file (or chunk) and byte offset so that a human can look with
    `chunkvol inspect`.
    """

    def __init__(self, message, path=None, offset=None):
        where = ""
        if path is not None:
            where = f" ({path}" + (f" at offset {offset}" if offset is not None else "") + ")"
        super().__init__(message + where)
        self.path = path
        self.offset = offset


class FormatError(CorruptionError):
    """A file that is not chunkvol's, or of a format version this build does not know."""


class PeerError(ChunkvolError):
    """Another node (or something posing as one) sent what a node of this pool never sends:
    records of another pool, records forged in its name, a batch that breaks the rules.
    Refused whole; nothing of it is applied."""


class UnreachableError(ChunkvolError):
    """A mirror or peer cannot be reached now (connection refused, link down, timeout); the
    shipper retries with backoff and nothing local waits for it."""


class AccessDeniedError(ChunkvolError):
    """An object store refused the credentials or the permissions it was given (a wrong key,
    a keyring without access to the pool, a bucket of someone else's). Retrying cannot help."""


class StoreKeyError(ChunkvolError):
    """An encrypted object store and a key that does not open it: no key was given, another
    key was, a key was given for a store that is not encrypted, or a key file is unreadable.
    Nothing was created or written."""
