"""Merging other nodes' writes into this pool's live state (docs/MULTIMASTER.md): last writer
wins per block, tombstones giving holes their stamps, the primaries of single-primary volumes
and the writes a promotion leaves out, split brain, and names created on two nodes.

Every rule gives the same state on every node whatever order the records arrive in, so the
nodes converge. Another node's versions wait for its COMMIT (BlockMap.seal_foreign)."""

from chunkvol.clock import node_index, node_index_of
from chunkvol.format import group_map
from chunkvol.format.record import BLOCK_SIZE, GROUP_BLOCKS


def writable_here(pool, info):
    """A single-primary volume takes writes only on its primary node."""
    return info.mode != "single-primary" or info.primary() in (None, pool.node_id)


def merge_foreign(pool, volume_id, offset_bytes, length_bytes, ref, hlc, node):
    """Another node's EXTENT (ref) or ZERO (None): each block takes it only if it is newer
    than what the block holds (last writer wins, tombstones giving holes their stamps).
    Returns False when the write is left out (an old primary's its successor never had)."""
    info = pool.volumes_by_id[volume_id]
    if info.mode == "single-primary":
        if info.discarded(node, hlc):
            return False
        primary = info.primary(at=hlc)
        if primary is not None and primary != node:
            note_split_brain(pool, info, node, primary, hlc)
    blockmap = pool.blockmap
    first_block = offset_bytes // BLOCK_SIZE
    end_block = first_block + length_bytes // BLOCK_SIZE
    txn = blockmap.reader()
    if ref is None:
        groups = []
        group = first_block // GROUP_BLOCKS
        end_group = (end_block + GROUP_BLOCKS - 1) // GROUP_BLOCKS
        while group < end_group:  # only groups that hold something: a hole over nothing changes nothing
            batch = blockmap.groups_in(txn, volume_id, group, end_group, 4096)
            if not batch:
                break
            groups.extend(batch)
            group = batch[-1] + 1
    else:
        groups = [first_block // GROUP_BLOCKS]
    for group in groups:
        start = max(first_block, group * GROUP_BLOCKS) - group * GROUP_BLOCKS
        end = min(end_block, (group + 1) * GROUP_BLOCKS) - group * GROUP_BLOCKS
        state = blockmap.get(txn, volume_id, group)
        floors = pool.tombstones.floors(volume_id, group)
        merged, before, held = group_map.merge(state, start, end - start, ref, hlc, floors)
        if ref is None:  # a hole meeting a hole is no conflict: either way it reads zeros
            before = [0 if other > data else other for other, data in zip(before, held)]
        blockmap.update_foreign(volume_id, group, merged if merged is not state else None,
                                start, end - start, ref, hlc, before)
    blockmap.foreign_written[volume_id] = blockmap.foreign_written.get(volume_id, 0) + length_bytes
    return True


# ---- tombstones -------------------------------------------------------------------------
def add_tombstone(pool, volume_id, offset_bytes, length_bytes, hlc, node):
    if pool.peer_nodes or pool.origins:  # only another writer's older record could need it
        pool.tombstones.add(volume_id, offset_bytes // BLOCK_SIZE, (offset_bytes + length_bytes) // BLOCK_SIZE,
                            hlc, node)


def prune_tombstones(pool):
    """Tombstones matter while a peer may still send a record older than them, or one
    written without having seen them (a conflict to report). They go up to the stamp to
    which every peer P has sent us its records and seen every other node's tombstones
    (the seen stamps of P's last COMMIT here)."""
    if not pool.tombstones.by_volume:
        return
    peers = set(pool.peer_nodes) | set(pool.origins)
    sent = min((pool.origin_stamps.get(peer, 0) for peer in peers), default=pool.clock.last)
    horizon = sent
    for origin in pool.tombstones.origins():
        for peer in peers:
            if peer != origin:
                horizon = min(horizon, pool.peer_seen.get(peer, {}).get(origin, 0))
    # One horizon for all origins: a block's newest tombstone goes only with every older
    # one, so what is left still names the block's newest ZERO (or none at all).
    pool.tombstones.prune(horizon)


# ---- the volume table -------------------------------------------------------------------
def settle_name(pool, info):
    """Two nodes created volumes of one name while apart: the older keeps it, the newer is
    renamed NAME.nodeN (N: its creator's index). The same on every node, whatever the order."""
    other = pool.volumes.get(info.name)
    if other is None or other.volume_id == info.volume_id:
        return
    newer = info if (info.created_hlc, info.volume_id) > (other.created_hlc, other.volume_id) else other
    name = f"{newer.name}.node{node_index_of(newer.created_hlc)}"
    while name in pool.volumes:
        name += "+"
    if newer is other:
        del pool.volumes[other.name]
        pool.blockmap.put_volume(other.name, None)
        other.name = name
        pool.volumes[name] = other
        pool.blockmap.put_volume(name, other.as_dict())
    else:
        info.name = name
    pool.notes.append(f"volume name {info.name if newer is other else other.name!r} was created on two nodes: "
                      f"the newer one is now {name!r}")


def apply_primary(pool, info, node, hlc, seen):
    """A VOLUME_PRIMARY record: `node` writes the single-primary volume from `hlc` on.
    Writes of the other nodes it had not received then (`seen`: the stamp of each one's
    last COMMIT it had) and made before `hlc` are left out of the volume everywhere: the
    new primary's filesystem moved on without them (DRBD discards them too); they stay in
    their node's log and history. If this node wrote it after that stamp (both were
    primary while apart), that is split brain: recorded, and resolved like any concurrent
    writes (last writer wins)."""
    if (hlc, node) in info.primaries:
        return
    info.primaries = sorted(info.primaries + [(hlc, node)])
    for other in set(pool.origins) | set(pool.peer_nodes) | {pool.node_id}:
        if other != node and seen.get(other, 0) < hlc:
            event = {"node": other, "after": seen.get(other, 0), "before": hlc}
            if event not in info.discards:
                info.discards.append(event)
                leave_out(pool, info, other, event["after"], hlc)
    if node != pool.node_id:
        mine = [stamp for stamp, _, writer in pool.blockmap.history(info.volume_id, after=hlc)
                if writer == pool.node_id]
        if mine:
            note_split_brain(pool, info, pool.node_id, node, min(mine))
    pool.blockmap.put_volume(info.name, info.as_dict())


def leave_out(pool, info, node, after, before):
    """Take `node`'s writes stamped in (after, before) back out of the volume's live state
    here; versions keep them (history still shows what was). In a single-primary volume
    nobody else wrote it in that window (its next primary writes from `before` on), so a
    block such a write holds gets back what it held at `after`."""
    index = node_index(node)

    def left_out(stamp):
        return node_index_of(stamp) == index and after < stamp < before

    volume_id = info.volume_id
    blockmap = pool.blockmap
    tombstones = pool.tombstones
    txn = blockmap.reader()
    groups = sorted({group for group, stamp, _ in blockmap.versions_of(volume_id) if stamp > after}
                    | {group for volume, group in blockmap.overlay if volume == volume_id})
    zeroes = {}  # group -> per block, the greatest left-out ZERO's stamp
    for group in groups:
        zeroes[group] = [0] * GROUP_BLOCKS
    for first, end, stamp, _, origin in tombstones.by_volume.get(volume_id, ()):
        if origin == node and left_out(stamp):
            for block in range(first, end):
                row = zeroes.get(block // GROUP_BLOCKS)
                if row is not None and stamp > row[block % GROUP_BLOCKS]:
                    row[block % GROUP_BLOCKS] = stamp
    floors_all = {group: tombstones.floors(volume_id, group) or [0] * GROUP_BLOCKS for group in groups}
    # A tombstone entry is [first block, end block, stamp, commit stamp, origin node].
    tombstones.drop(volume_id, lambda entry: entry[4] == node and left_out(entry[2]))
    for group in groups:
        live = blockmap.get(txn, volume_id, group)
        if live is None:
            continue
        earlier = group_map.to_blocks(blockmap.stored_state(txn, volume_id, group, after))
        blocks = group_map.to_blocks(live)
        changed = False
        for block, entry in enumerate(blocks):
            if entry is not None:
                (_, _, stamp, _), _ = entry  # (the block's ref, its block within the record)
                held_by_left_out = left_out(stamp)
            else:
                held_by_left_out = zeroes[group][block] and zeroes[group][block] == floors_all[group][block]
            if held_by_left_out:
                blocks[block] = earlier[block]
                changed = True
        if changed:
            blockmap.update(volume_id, group, group_map.from_blocks(blocks), before, node)


def note_split_brain(pool, info, writer, primary, stamp):
    for event in info.split_brain:
        if event["writer"] == writer and event["primary"] == primary:
            event["first"] = min(event["first"], stamp)
            event["last"] = max(event["last"], stamp)
            break
    else:
        info.split_brain.append({"writer": writer, "primary": primary, "first": stamp, "last": stamp})
        pool.notes.append(f"split brain on volume {info.name!r}: node {writer} wrote while node {primary} "
                          "was primary; resolved by last writer wins (`chunkvol conflicts`)")
    pool.blockmap.put_volume(info.name, info.as_dict())
