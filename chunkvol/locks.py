"""Lock files: a file flock'ed by the one process that may do a job (write a pool, ship its
mirrors), holding that process's pid for error messages. The kernel lets go of the lock when
the process ends, kill -9 included, so a lock never outlives its holder."""

import fcntl
import os

from chunkvol.errors import PoolBusyError


def hold(path, busy_message):
    """Take the lock at `path` for this process; returns its descriptor (closing it lets go).
    PoolBusyError(busy_message, with the holder's pid) when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise PoolBusyError(busy_message.format(pid=holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def is_held(path):
    """True while some process holds the lock at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
