"""Failures by kind, for `chunkvol_errors_total{kind}`: io (a disk or the files under a
dir: mirror), corruption (bytes that fail their checksum or format), peer (another node:
refused batches, a peer's link) and store (an object store: a mirror, an evicted chunk).

The server counts what its requests and its receiver meet; the shipper, in its own process,
counts its failures into a small JSON file next to the control socket (one per pool), which
it rewrites on each failure and the server reads at scrape time. The file outlives a shipper
restart, so its counts only grow while the machine is up.
"""

import json
import os
import threading

from chunkvol import control, errors
from chunkvol.mirror import targets
from chunkvol.storage.files import LocalFiles

KINDS = ("io", "corruption", "peer", "store")
STORE_SCHEMES = ("rados", "s3")


def kind_of(error, target=None):
    """The kind of a failure; `target`: the mirror's `to` when it happened while shipping."""
    if isinstance(error, errors.CorruptionError):
        return "corruption"
    if isinstance(error, errors.PeerError):
        return "peer"
    if isinstance(error, errors.AccessDeniedError):
        return "store"
    if target is not None:
        scheme = targets.parse_target(target)[0]
        if scheme == "node":
            return "peer"
        if scheme in STORE_SCHEMES:
            return "store"
    return "io"


class ErrorCounts:
    """{kind: count}, shared by threads. With `path`, each count is also published there."""

    def __init__(self, path=None):
        self.lock = threading.Lock()
        self.path = path
        self.counts = dict.fromkeys(KINDS, 0)
        if path is not None:
            for kind, count in read_counts(path).items():
                self.counts[kind] += count

    def count(self, kind):
        with self.lock:
            self.counts[kind] += 1
            snapshot = dict(self.counts)
        if self.path is not None:
            try:
                LocalFiles().publish(self.path, json.dumps(snapshot).encode())
            except OSError:
                pass  # the count is lost, not the shipping: the runtime directory is a side file

    def snapshot(self):
        with self.lock:
            return dict(self.counts)


def shipper_counts_path(pool_path):
    """Where the pool's shipper publishes its ErrorCounts: beside the control socket."""
    return control.socket_path(pool_path)[:-len(".sock")] + ".shipper-errors.json"


def read_counts(path):
    """{kind: count} from a published file; {} if there is none or it is not ours."""
    try:
        found = json.loads(LocalFiles().read_file(path))
    except (OSError, ValueError):
        return {}
    if not isinstance(found, dict):
        return {}
    return {kind: found[kind] for kind in KINDS if isinstance(found.get(kind), int) and found[kind] >= 0}
