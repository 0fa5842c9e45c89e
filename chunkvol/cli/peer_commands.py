"""`chunkvol peer add|list|remove|status` and `chunkvol conflicts VOL`: nodes of one pool that
all write (multi-master). A peer is a mirror in both directions: each node ships its own
records to the other (mirrors.json marks the definition `peer`, with the peer's node id), and
each applies the other's by last writer wins (README, "Multi-master")."""

import json
import time

from chunkvol import history
from chunkvol.cli.common import open_pool_for_reading, pool_path, run_operation
from chunkvol.cli.sizes import format_size, parse_size
from chunkvol.clock import node_index, node_index_of
from chunkvol.errors import AlreadyExistsError, ChunkvolError, NotFoundError, UnreachableError, UsageError
from chunkvol.format import chunk_header
from chunkvol.format import mirrors as mirrors_format
from chunkvol.format.record import BLOCK_SIZE
from chunkvol.mirror import config as mirror_config
from chunkvol.mirror import identity, targets
from chunkvol.mirror import shipper as shipping
from chunkvol.mirror.source import age_seconds
from chunkvol.pool import Pool


def register(commands):
    peer = commands.add_parser("peer", help="nodes of this pool that write too (multi-master)")
    actions = peer.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    add = actions.add_parser("add", help="pair with another node of the pool: each ships its writes to the other")
    add.add_argument("name")
    add.add_argument("--address", required=True, metavar="HOST:PORT", help="where the peer listens "
                                                                           "(`serve --listen` there)")
    add.add_argument("--bandwidth", help="bytes per second at most, e.g. 16M (default: no limit)")
    add.set_defaults(run=peer_add)
    listing = actions.add_parser("list", help="this node's peers")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=peer_list)
    remove = actions.add_parser("remove", help="stop shipping to a peer")
    remove.add_argument("name")
    remove.set_defaults(run=peer_remove)
    status = actions.add_parser("status", help="per peer: connection, lag each way, conflicts")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=peer_status)
    conflicts = commands.add_parser("conflicts", help="block ranges two nodes wrote concurrently, and which won")
    conflicts.add_argument("volume")
    conflicts.add_argument("--json", action="store_true")
    conflicts.set_defaults(run=conflicts_command)


def _peers(path):
    return {name: definition for name, definition in mirror_config.load_mirrors(path).items() if definition.get("peer")}


def peer_add(arguments):
    path, fields = pool_path(arguments)
    if not mirrors_format.NAME.match(arguments.name):
        raise UsageError(f"invalid peer name {arguments.name!r}: letters, digits, '.', '_', '+', '-'")
    target = targets.normalize(f"node:{arguments.address}")
    if targets.parse_target(target)[0] != "node":
        raise UsageError(f"--address {arguments.address!r}: use HOST:PORT")
    bandwidth = parse_size(arguments.bandwidth) if arguments.bandwidth else None
    mirrors = mirror_config.load_mirrors(path)
    if arguments.name in mirrors:
        raise AlreadyExistsError(f"{arguments.name!r} exists already (to {mirrors[arguments.name]['to']})")
    if fields.get("role") == "mirror":
        # A node that joined as a mirror becomes a writer: it pairs with its source.
        run_operation(path, "become_writer")
        fields = Pool.read_metadata(path)
        print(f"{path} was a mirror; it is now a writing node of the pool (node {fields['node_id']})")
    identity.ensure_authority(path, fields)
    # Learn who answers there (its certificate says). A peer that is not up yet is recorded
    # all the same, as DRBD and rbd-mirror let both sides be configured first, in any order:
    # the shipper connects when it comes up and learns its node then.
    node, away = None, None
    try:
        link = targets.open_target(target, fields, path)
    except (UnreachableError, OSError) as error:
        away = error
    else:
        try:
            node = link.peer
        finally:
            link.close()
        mirror_config.check_peer_node(fields["node_id"], node)
    mirrors[arguments.name] = {"to": target, "bandwidth": bandwidth, "peer": True, "node": node,
                               "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    mirror_config.save_mirrors(path, mirrors)
    mirror_config.save_state(path, arguments.name,
                             mirror_config.mirror_state.initial(chunk_header.address(1, chunk_header.DATA_OFFSET)))
    if away is not None:
        print(f"peer {arguments.name} at {arguments.address} is not up yet ({away}): recorded; this node "
              "connects when it comes up (`chunkvol peer status` shows it connecting)")
    else:
        print(f"peer {arguments.name} (node {node}) at {arguments.address}: this node ships its writes there")
    print("add this node on it too (`chunkvol --pool ... peer add NAME --address THIS_HOST:PORT`)")


def peer_list(arguments):
    path, _ = pool_path(arguments)
    rows = [{"name": name, **definition} for name, definition in sorted(_peers(path).items())]
    if arguments.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no peers")
    for row in rows:
        node = row["node"] if row["node"] is not None else "? (not up yet)"
        print(f"{row['name']}  node {node} at {row['to'][5:]}  (added {row['added']})")


def peer_remove(arguments):
    path, _ = pool_path(arguments)
    mirrors = mirror_config.load_mirrors(path)
    if arguments.name not in mirrors or not mirrors[arguments.name].get("peer"):
        raise NotFoundError(f"no peer {arguments.name!r}")
    mirror_config.remove_mirror(path, mirrors, arguments.name)
    print(f"removed peer {arguments.name}: this node no longer ships to it (remove this node there too)")


def peer_status(arguments):
    path, fields = pool_path(arguments)
    peers = _peers(path)
    with open_pool_for_reading(path) as pool:
        horizon, next_sequence = pool.writer.durable_address, pool.next_sequence
        origins, origin_stamps = dict(pool.origins), dict(pool.origin_stamps)
        conflicts = {name: len(pool.blockmap.conflicts(info.volume_id)) for name, info in pool.volumes.items()}
        split = {name: info.split_brain for name, info in pool.volumes.items() if info.split_brain}
    rows = []
    for name, definition in sorted(peers.items()):
        node = definition["node"]
        shipper = shipping.Shipper(path, fields, name, definition)
        try:
            outgoing = shipper.status(horizon, next_sequence)
        finally:
            shipper.close()
        row = {"name": name, "node": node, "address": definition["to"][5:], "connected": False, "error": None,
               "outgoing": {key: outgoing[key] for key in ("state", "records_behind", "bytes_behind",
                                                           "seconds_behind", "throughput_bytes_per_second",
                                                           "last_error")},
               "incoming": {"records_held": origins.get(node, 0), "last_commit": origin_stamps.get(node, 0),
                            "records_behind": None, "bytes_behind": None, "seconds_behind": None}}
        row["connecting"] = node is None  # recorded before it was up; not reached since
        try:
            link = targets.open_target(definition["to"], fields, path)
        except (ChunkvolError, OSError) as error:
            row["error"] = str(error)
        else:
            try:
                if node is None:
                    node = row["node"] = mirror_config.learn_peer_node(path, name, fields["node_id"], link.peer)
                    row["connecting"] = False
                theirs = link.status
                row["connected"] = True
                behind = max(0, theirs.get("next_sequence", 1) - 1 - origins.get(node, 0))
                row["incoming"].update({
                    "records_behind": behind, "bytes_behind": theirs.get("bytes_behind"),
                    "seconds_behind": round(max(0.0, age_seconds(origin_stamps.get(node, 0))
                                                - age_seconds(theirs.get("committed_stamp", 0))), 3)
                    if behind else 0.0})
            finally:
                link.close()
        rows.append(row)
    report = {"node": fields["node_id"], "peers": rows, "conflicts": conflicts, "split_brain": split}
    if arguments.json:
        print(json.dumps(report, indent=2))
        return
    if not rows:
        print("no peers (`chunkvol peer add NAME --address HOST:PORT`)")
    for row in rows:
        out, inc = row["outgoing"], row["incoming"]
        if row["connected"]:
            link = "connected"
        elif row["connecting"]:
            link = f"connecting: not up yet ({row['error']})"
        else:
            link = f"not reachable ({row['error']})"
        print(f"{row['name']}  node {row['node'] if row['node'] is not None else '?'} at {row['address']}: {link}")
        print(f"  to it:   {out['state']}, behind {out['records_behind']} records, {format_size(out['bytes_behind'])},"
              f" {out['seconds_behind']}s" + (f"; last error: {out['last_error']}" if out["last_error"] else ""))
        if inc["records_behind"] is None:
            print(f"  from it: {inc['records_held']} records held (its side is not reachable now)")
        else:
            size = format_size(inc["bytes_behind"]) if inc["bytes_behind"] is not None else "?"
            print(f"  from it: behind {inc['records_behind']} records, {size}, {inc['seconds_behind']}s")
    total = sum(conflicts.values())
    print(f"conflicts: {total}" + (" (" + ", ".join(f"{name}: {count}" for name, count in sorted(conflicts.items())
                                                       if count) + "; `chunkvol conflicts VOL`)" if total else ""))
    for name, events in sorted(split.items()):
        for event in events:
            print(f"split brain on {name}: node {event['writer']} wrote while node {event['primary']} was primary "
                  f"({history.format_stamp(event['first'])} .. {history.format_stamp(event['last'])})")


def conflicts_command(arguments):
    with open_pool_for_reading(arguments.pool) as pool:
        info = pool.volume_info(arguments.volume)
        nodes = {node_index(node): node for node in {pool.node_id, *pool.peer_nodes, *pool.origins}}
        rows = []
        for _, first, end, other, stamp in pool.blockmap.conflicts(info.volume_id):
            winner = max(other, stamp)
            rows.append({"offset": first * BLOCK_SIZE, "length": (end - first) * BLOCK_SIZE,
                         "first_write": {"stamp": other, "time": history.format_stamp(other),
                                         "node": nodes.get(node_index_of(other))},
                         "second_write": {"stamp": stamp, "time": history.format_stamp(stamp),
                                          "node": nodes.get(node_index_of(stamp))},
                         "winner_node": nodes.get(node_index_of(winner)), "winner_stamp": winner})
        rows.sort(key=lambda row: (row["offset"], row["second_write"]["stamp"]))
        split = list(info.split_brain)
        discards = list(info.discards)
    if arguments.json:
        print(json.dumps({"volume": arguments.volume, "conflicts": rows, "split_brain": split,
                          "left_out": discards}, indent=2))
        return
    if not rows and not split and not discards:
        print(f"no conflicts on {arguments.volume}")
    for row in rows:
        print(f"bytes {row['offset']}+{row['length']} ({format_size(row['offset'])}): node {row['first_write']['node']} at "
              f"{row['first_write']['time']} and node {row['second_write']['node']} at {row['second_write']['time']}"
              f" wrote without seeing each other; node {row['winner_node']}'s write won")
    for event in split:
        print(f"split brain: node {event['writer']} wrote while node {event['primary']} was primary "
              f"({history.format_stamp(event['first'])} .. {history.format_stamp(event['last'])})")
    for event in discards:
        print(f"left out: node {event['node']}'s writes after {history.format_stamp(event['after'])} and before "
              f"{history.format_stamp(event['before'])}, which the next primary never received; they stay in that "
              "node's log and history")
