"""Key files of encrypted object-store mirrors (format/store_key.py): made by `chunkvol key
generate`, read by the mirror's shipper, restore, self-healing and the read of evicted chunks.

Opened directly, outside the storage seam, like the pool's identity keys: a key file is
written once and read whole.
"""

import os

from chunkvol.errors import AlreadyExistsError, FormatError, StoreKeyError
from chunkvol.format import store_key

KEY_MODE = 0o600


def generate_key(path):
    """Write a new random key to `path` (mode 0600, never over an existing file); its StoreKey."""
    master = os.urandom(store_key.KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, KEY_MODE)
    except FileExistsError:
        raise AlreadyExistsError(f"{path} exists: a key file is never overwritten (the mirrors it opens "
                                 "would be lost)") from None
    try:
        os.fchmod(fd, KEY_MODE)  # whatever the umask
        os.write(fd, store_key.encode(master))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    directory = os.path.dirname(os.path.abspath(path))
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return store_key.StoreKey(master, path)


def load_key(path, fingerprint=None):
    """The StoreKey in the file at `path`; StoreKeyError when it cannot be read, is not a key
    file, or is not the key of `fingerprint` (when given: the one a mirror was added with)."""
    try:
        with open(path, "rb") as opened:
            mode = os.fstat(opened.fileno()).st_mode & 0o777
            data = opened.read(4096)
    except OSError as error:
        raise StoreKeyError(f"cannot read the key file {path}: {error.strerror or error}") from None
    try:
        key = store_key.decode(data, path)
    except FormatError as error:
        raise StoreKeyError(str(error)) from None
    if mode & 0o077:
        # As ssh does with a private key: a key others can read is a key others may have.
        raise StoreKeyError(f"the key file {path} can be read by others (mode {mode:04o}): `chmod 600 {path}` "
                            "and check who may have copied it")
    if fingerprint is not None and key.fingerprint != fingerprint:
        raise StoreKeyError(f"{path} holds the key {key.fingerprint}, not {fingerprint}, the one this mirror was "
                            "added with")
    return key
