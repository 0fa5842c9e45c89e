"""The Python ceiling: an nbdkit Python plugin whose disk is one bytearray.

    nbdkit -f -U SOCK python tools/bench/plugins/pymem.py size=4G [thread_model=parallel]

Why: any Python plugin pays nbdkit's call into the embedded interpreter and the GIL on every
request. This plugin does nothing else (a slice copy per request), so its numbers are the
most a Python store such as chunkvol can reach on this machine, and chunkvol's ratio to it
is the cost of the store itself.

Keys: ``size`` (bytes, or with a K/M/G/T suffix; required); ``thread_model``: one of
``serialize_all_requests`` (the Python plugin default, fastest for CPU-bound callbacks),
``serialize_requests`` or ``parallel``.

Flush has nothing to do (the data is in memory), so it returns at once; multi-conn is safe
for the same reason.
"""

import nbdkit

API_VERSION = 2

SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
THREAD_MODELS = {
    "serialize_all_requests": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
}

size_bytes = None
thread_model_name = "serialize_all_requests"
disk = None
disk_view = None


def parse_size(text):
    text = text.strip().upper().rstrip("B").rstrip("I")
    suffix = text[-1] if text and text[-1] in SIZE_SUFFIXES else ""
    number = text[:-1] if suffix else text
    return int(number) * SIZE_SUFFIXES[suffix]


def config(key, value):
    global size_bytes, thread_model_name
    if key == "size":
        size_bytes = parse_size(value)
    elif key == "thread_model":
        if value not in THREAD_MODELS:
            raise RuntimeError(f"thread_model must be one of {sorted(THREAD_MODELS)}, not {value!r}")
        thread_model_name = value
    else:
        raise RuntimeError(f"unknown key {key!r} (known: size, thread_model)")


def config_complete():
    global disk, disk_view
    if size_bytes is None or size_bytes <= 0:
        raise RuntimeError("size=BYTES is required")
    disk = bytearray(size_bytes)
    disk_view = memoryview(disk)


def thread_model():
    return THREAD_MODELS[thread_model_name]


def open(readonly):
    return 1


def get_size(handle):
    return size_bytes


def can_multi_conn(handle):
    return True


def can_flush(handle):
    return True


def can_zero(handle):
    return True


def pread(handle, buf, offset, flags):
    buf[:] = disk_view[offset:offset + len(buf)]


def pwrite(handle, buf, offset, flags):
    disk_view[offset:offset + len(buf)] = buf


ZERO_PIECE_BYTES = 64 << 20


def zero(handle, count, offset, flags):
    end = offset + count
    while offset < end:
        piece = min(ZERO_PIECE_BYTES, end - offset)
        disk_view[offset:offset + piece] = bytes(piece)
        offset += piece


def flush(handle, flags):
    pass
