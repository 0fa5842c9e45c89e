"""Helpers shared by commands."""

import fcntl
import os

from chunkvol.pool import Pool


def pool_is_busy(path):
    """True when another process holds the pool open for writing (a running server)."""
    lock_path = os.path.join(os.path.abspath(path), "lock")
    if not os.path.exists(lock_path):
        return False
    fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def open_pool_for_reading(path):
    """Read-write when free (so a torn tail is cut and the map brought up to date), read-only
    beside a running server."""
    return Pool.open(path, readonly=pool_is_busy(path))


def run_operation(path, op, **args):
    """A change to a pool (chunkvol.operations): through its server's control socket when a
    server holds it, else on the pool opened here."""
    from chunkvol import control
    from chunkvol.operations import OPERATIONS
    if pool_is_busy(path):
        return control.call(path, op, **args)
    with Pool.open(path) as pool:
        return OPERATIONS[op](pool, **args)
