"""Helpers shared by commands."""

import os

from chunkvol import control, locks
from chunkvol.errors import UsageError
from chunkvol.operations import OPERATIONS
from chunkvol.pool import Pool


def pool_is_busy(path):
    """True when another process holds the pool open for writing (a running server)."""
    return locks.is_held(os.path.join(os.path.abspath(path), "lock"))


def pool_path(arguments):
    """The absolute path of the pool the command names (--pool), and its pool.json fields."""
    if not arguments.pool:
        raise UsageError("name the pool with --pool PATH (or $CHUNKVOL_POOL)")
    path = os.path.abspath(arguments.pool)
    return path, Pool.read_metadata(path)


def open_pool_for_reading(path):
    """Read-write when free (so a torn tail is cut and the map brought up to date), read-only
    beside a running server."""
    return Pool.open(path, readonly=pool_is_busy(path))


def run_operation(path, op, **args):
    """A change to a pool (chunkvol.operations): through its server's control socket when a
    server holds it, else on the pool opened here."""
    if pool_is_busy(path):
        return control.call(path, op, **args)
    with Pool.open(path) as pool:
        return OPERATIONS[op](pool, **args)
