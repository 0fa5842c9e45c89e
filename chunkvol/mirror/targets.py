"""Where a mirror's batches go.

`dir:PATH` is a pool on another disk (or any directory), written by the shipper itself: it is
created at the first use as a mirror of this pool (same pool identity, a node id of its own,
role "mirror"), and opened with its lock held while shipping, so it can be served read-only
(`chunkvol --pool PATH serve --readonly`) at the same time. `node:HOST:PORT` is another node
of the pool (joined with `init --join`), reached over mutual TLS (mirror/node_link.py).
`rados:CEPH_CONF:RADOS_POOL` and `s3:URL/BUCKET` are object stores (chunkvol/objstore), which
hold the log as segments (mirror/object_target.py), for `restore` and for evicted chunks.
"""

import os

from chunkvol import copies, objstore
from chunkvol.clock import MAX_NODES, new_node_id
from chunkvol.errors import PeerError, UsageError
from chunkvol.format import mirrors as mirrors_format
from chunkvol.mirror import config as mirror_config
from chunkvol.mirror import identity, receiver
from chunkvol.mirror.node_link import NodeTarget
from chunkvol.mirror.object_target import ObjectTarget
from chunkvol.pool import Pool


def parse_target(text):
    """("dir", absolute path), ("node", host, port), ("rados", conf, pool) or ("s3", endpoint,
    bucket); UsageError for anything else."""
    if isinstance(text, str) and text.startswith(("rados:", "s3:")):
        return objstore.parse_url(text)
    if not isinstance(text, str) or not mirrors_format.TARGET.match(text):
        raise UsageError(f"mirror target {text!r}: use dir:/absolute/path, node:HOST:PORT, "
                         "rados:/path/ceph.conf:RADOS_POOL or s3:http(s)://HOST[:PORT]/BUCKET")
    kind, _, rest = text.partition(":")
    if kind == "dir":
        return "dir", os.path.abspath(rest)
    host, _, port = rest.rpartition(":")
    if not 0 < int(port) < 65536:
        raise UsageError(f"mirror target {text!r}: port out of range")
    return "node", host, int(port)


def normalize(text):
    """The target as it is stored: a dir: path made absolute."""
    if isinstance(text, str) and text.startswith("dir:") and not text.startswith("dir:/"):
        text = "dir:" + os.path.abspath(text[4:])
    if isinstance(text, str) and text.startswith("rados:") and not text.startswith("rados:/") and ":" in text[6:]:
        conf, _, rados_pool = text[6:].rpartition(":")
        text = f"rados:{os.path.abspath(conf)}:{rados_pool}"
    parsed = parse_target(text)
    return f"dir:{parsed[1]}" if parsed[0] == "dir" else text


def open_target(text, source_fields, pool_path, network=None, key=None):
    """The target named by `text`; `network` (chunkvol/network.py) reaches node: and object
    store targets (the real one unless given); `key`: the StoreKey of an encrypted object-store
    mirror (mirror/config.py's key_of)."""
    if key is not None and not text.startswith(("rados:", "s3:")):
        raise UsageError("--key is for object-store mirrors (rados:, s3:); dir: and node: mirrors are yours")
    parsed = parse_target(text)
    if parsed[0] == "dir":
        return DirTarget(parsed[1], source_fields, pool_path)
    if parsed[0] in ("rados", "s3"):
        return ObjectTarget(text, source_fields, network, key)
    return NodeTarget(parsed[1], parsed[2], source_fields, pool_path, network)


class DirTarget:
    """A mirror pool in a directory, opened in this process (a Target, mirror/target.py)."""

    # Measured: a read-ahead only made the shipper fault in fresh pages for every batch, and
    # the receiver's sync is the limit anyway (object_target.py, docs/BENCH.md).
    READ_AHEAD = False

    def __init__(self, path, source_fields, source_path):
        self.path = path
        self.pool_uuid = bytes.fromhex(source_fields["pool_uuid"])
        self.source_node = source_fields["node_id"]
        if not os.path.exists(os.path.join(path, "pool.json")):
            # Promoted one day, the mirror writes: its index must be one no node of the pool
            # has had (this node, those it issued join files or mirrors to, its peers).
            taken = [self.source_node, *identity.issued_nodes(source_path), *mirror_config.peer_nodes(source_path)]
            node_id = new_node_id(taken)
            if node_id is None:
                raise UsageError(f"the pool's {MAX_NODES} node indexes are all taken (nodes {sorted(taken)}): "
                                 "a mirror could never be promoted; mirror to an object store instead")
            identity.note_issued(source_path, node_id)
            Pool.create(path, chunk_size=source_fields["chunk_size"], node_id=node_id,
                        pool_uuid=self.pool_uuid, mirror_of=self.source_node)
        self.pool = Pool.open(path)
        if self.pool.pool_uuid != self.pool_uuid:
            self.pool.close()
            raise PeerError(f"{path} holds another pool ({self.pool.pool_uuid.hex()}), not a mirror of this one")
        if self.pool.node_id == self.source_node:
            self.pool.close()
            raise PeerError(f"{path} is this node itself (node {self.source_node})")

    def have(self, origin):
        return receiver.have(self.pool, origin)

    def send(self, origin, records):
        return receiver.receive(self.pool, self.pool_uuid, origin, records)

    def fetch(self, volume_ids, group, ref, record_offset):
        return copies.live_copy(self.pool, volume_ids, group, ref, record_offset)

    def describe(self):
        return {"node": self.pool.node_id, "path": self.path}

    def close(self):
        self.pool.close()
