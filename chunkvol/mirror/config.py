"""A pool's mirrors on disk: their definitions (`POOL/mirrors.json`, format/mirrors.py) and
each one's durable cursor (`POOL/mirrors/NAME.state`, format/mirror_state.py). Compaction
asks `held_chunk` which chunks a mirror still needs.
"""

import os

from chunkvol import locks
from chunkvol.clock import node_index
from chunkvol.errors import NotFoundError, UsageError
from chunkvol.format import chunk_header
from chunkvol.format import mirror_state, mirrors as mirrors_format
from chunkvol.objstore.keys import load_key
from chunkvol.storage.files import LocalFiles


def shipper_lock_path(pool_path):
    return os.path.join(pool_path, "mirrors", "shipper.lock")


def hold_shipper(pool_path):
    """Mark this process as the pool's shipper (`mirror run`, which `serve` starts) while the
    returned descriptor stays open; PoolBusyError if another one already is. `mirror sync`
    then follows that shipper instead of shipping beside it."""
    os.makedirs(os.path.dirname(shipper_lock_path(pool_path)), exist_ok=True)
    return locks.hold(shipper_lock_path(pool_path),
                      f"a shipper (`mirror run`, or `serve`'s) already runs for {pool_path} (pid {{pid}})")


def shipper_running(pool_path):
    """True while some process holds the pool's shipper lock (hold_shipper)."""
    return locks.is_held(shipper_lock_path(pool_path))


def mirrors_path(pool_path):
    return os.path.join(pool_path, "mirrors.json")


def state_path(pool_path, name):
    return os.path.join(pool_path, "mirrors", f"{name}.state")


def load_mirrors(pool_path, files=None):
    files = files or LocalFiles()
    path = mirrors_path(pool_path)
    if not os.path.exists(path):
        return {}
    return mirrors_format.decode(files.read_file(path), path)


def save_mirrors(pool_path, mirrors, files=None):
    (files or LocalFiles()).publish(mirrors_path(pool_path), mirrors_format.encode(mirrors))


def load_state(pool_path, name, first_address, files=None):
    path = state_path(pool_path, name)
    if not os.path.exists(path):
        return mirror_state.initial(first_address)
    return mirror_state.decode((files or LocalFiles()).read_file(path), path)


def save_state(pool_path, name, state, files=None):
    os.makedirs(os.path.join(pool_path, "mirrors"), exist_ok=True)
    (files or LocalFiles()).publish(state_path(pool_path, name), mirror_state.encode(state))


def key_of(definition):
    """The StoreKey of an encrypted object-store mirror (its key file, checked against the
    fingerprint it was added with), or None for a mirror without a key."""
    if not definition.get("key"):
        return None
    return load_key(definition["key"], definition.get("key_fingerprint"))


def store_key_path(pool_path, store_url, files=None):
    """(key path, fingerprint) of the object-store mirror whose store is `store_url`, or
    (None, None) when it has no key."""
    for definition in load_mirrors(pool_path, files).values():
        if definition["to"] == store_url and definition.get("key"):
            return definition["key"], definition.get("key_fingerprint")
    return None, None


def held_chunk(pool_path, files=None):
    """The lowest chunk some mirror still needs (compaction keeps it and every later one),
    or None without mirrors."""
    lowest = None
    for name in load_mirrors(pool_path, files):
        state = load_state(pool_path, name, chunk_header.address(1, chunk_header.DATA_OFFSET), files)
        chunk_id = chunk_header.split_address(state["cursor"])[0]
        lowest = chunk_id if lowest is None else min(lowest, chunk_id)
    return lowest


def remove_mirror(pool_path, mirrors, name, files=None):
    """Drop a mirror (or peer) definition and its cursor; its data stays where it is."""
    mirrors.pop(name)
    save_mirrors(pool_path, mirrors, files)
    try:
        os.unlink(state_path(pool_path, name))
    except FileNotFoundError:
        pass


def peer_nodes(pool_path, files=None):
    """Node ids of the pool's peers (`peer add`): nodes that write too (multi-master)."""
    try:
        mirrors = load_mirrors(pool_path, files)
    except OSError:
        return frozenset()
    return frozenset(definition["node"] for definition in mirrors.values()
                     if definition.get("peer") and isinstance(definition.get("node"), int))


def check_peer_node(own_node, node):
    """A peer must be another node of the pool, with an index of its own (clock.py)."""
    if node_index(node) == node_index(own_node):
        raise UsageError(f"node {node} has this node's index ({node_index(node)}): it cannot write beside it")


def learn_peer_node(pool_path, name, own_node, node, files=None):
    """A peer recorded before it was up answered at last: note which node it is (its
    certificate said), once; returns it."""
    check_peer_node(own_node, node)
    mirrors = load_mirrors(pool_path, files)
    definition = mirrors.get(name)
    if definition is not None and definition.get("peer") and definition.get("node") is None:
        definition["node"] = node
        save_mirrors(pool_path, mirrors, files)
    return node


def definition_of(pool_path, name, files=None):
    mirrors = load_mirrors(pool_path, files)
    if name not in mirrors:
        raise NotFoundError(f"no mirror {name!r} (mirrors: {', '.join(sorted(mirrors)) or 'none'})")
    return mirrors[name]
