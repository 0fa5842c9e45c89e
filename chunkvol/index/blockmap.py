"""BlockMap: (volume, block) -> versions -> where each version's record lives.

A derived cache of the log, kept in LMDB (measured ~4x faster than SQLite for lookups here).
Every version of a 64 KiB map group is one entry (format/group_map.py), so the live state is
one seek (the newest version) and so is any past flush point (the newest version at or before
its stamp), however deep the history.

Writes do not touch LMDB. They change an in-memory overlay of group states; at each flush
point the groups changed since the previous one are sealed into versions keyed by the flush
point's stamp, so "as of stamp T" is the newest version at or before T; a checkpoint writes
the sealed versions and the log address they reflect in one synced LMDB transaction. Until
then, sealed versions are looked up in memory, so past points read the same either way.

Beside the groups, LMDB holds the volume table, each volume's flush-point history
(format/history.py) and its named snapshots (JSON, keyed by volume id and name). A clone has
no versions of its own until written: a group it never wrote is read from its parent as of
the snapshot it was cloned from (`parents`), the way rbd layers a clone on its parent. The
overlay then stays as a cache of checkpointed states until it outgrows OVERLAY_CACHE_GROUPS, so
memory is bounded by that and by the checkpoint interval, not by the volume, and a crash loses
only what replaying the log's tail rebuilds. Delete the `index` directory and the map is rebuilt from the whole log.

A read-only map (beside a running server) reads everything, checkpoint included, through the
one LMDB snapshot it takes at open, so it never mixes versions the writer checkpoints later
with the log tail it replayed itself.

Callers hold the pool lock around every method.
"""

import json
import os

import lmdb

from chunkvol.clock import node_index, node_index_of
from chunkvol.errors import CorruptionError, DeviceFailedError, OutOfSpaceError
from chunkvol.format import checkpoint as checkpoint_format
from chunkvol.format import conflict as conflict_format
from chunkvol.format import group_map
from chunkvol.format import history as history_format
from chunkvol.format import origins as origins_format
from chunkvol.format import tombstones as tombstones_format
from chunkvol.index.stored_versions import CHECKPOINT_KEY, StoredVersions

MAP_SIZE_BYTES = 1 << 40  # address space only; the file grows as needed
ORIGINS_KEY = b"origins"
ORIGIN_STAMPS_KEY = b"origin_stamps"  # same layout as origins: node -> greatest COMMIT stamp received
TOMBSTONES_KEY = b"tombstones"
REMOVED_VOLUMES_KEY = b"removed_volumes"
OVERLAY_CACHE_GROUPS = 16384  # checkpointed group states kept in memory (a few tens of MiB)


class BlockMap(StoredVersions):
    def __init__(self, path, readonly=False):
        self.path = path
        if not readonly:
            os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(path, map_size=MAP_SIZE_BYTES, subdir=True, max_dbs=6,
                                 readonly=readonly, readahead=False, meminit=False, create=not readonly)
        except lmdb.Error as error:
            raise CorruptionError(f"the block map is not a readable LMDB file ({error})", path) from None
        self.readonly = readonly
        self._check_file_size()
        self.groups_db = self.env.open_db(b"groups", create=not readonly)
        self.meta_db = self.env.open_db(b"meta", create=not readonly)
        self.volumes_db = self.env.open_db(b"volumes", create=not readonly)
        self.history_db = self.env.open_db(b"history", create=not readonly)
        self.snapshots_db = self.env.open_db(b"snapshots", create=not readonly)
        try:
            self.conflicts_db = self.env.open_db(b"conflicts", create=not readonly)
        except lmdb.NotFoundError:  # a read-only map of a pool that never met another writer
            self.conflicts_db = None
        self.overlay = {}        # (volume_id, group) -> state, changed since the last checkpoint
        self.dirty = {}          # (volume_id, group) -> (hlc, node) changed since the last seal
        self.written = {}        # volume_id -> bytes written since its last flush point
        self.sealed = {}         # (volume_id, group) -> [(stamp, node, state)], oldest first, not yet in LMDB
        self.sealed_count = 0
        self.history_puts = {}   # history key -> value, not yet in LMDB
        self.removed_volumes = []  # volume ids whose versions go at the next checkpoint
        self.volume_puts = {}    # name -> JSON bytes (None: delete) for the next checkpoint
        self.snapshot_puts = {}  # (volume_id, name) -> JSON bytes (None: delete)
        self.prunes = []         # (volume_id, before, keep stamps) for the next checkpoint
        self.parents = {}        # clone volume_id -> (parent volume_id, snapshot stamp)
        self._read_txn = None
        self._cursor = None
        self.undo = None  # during a client request: (key, state, stamp) before each change
        # Records of other nodes, applied last-writer-wins, until their origin's COMMIT:
        self.foreign = {}          # (volume_id, group) -> [(first, count, ref or None, stamp, stamps before)]
        self.foreign_written = {}  # volume_id -> bytes
        self.conflict_puts = {}    # format/conflict.py key -> value, for the next checkpoint

    @classmethod
    def open_checked(cls, path, readonly=False):
        """(the map at `path`, its checkpoint or None). CorruptionError, the map closed again,
        when it is not a sound LMDB file or its checkpoint is damaged."""
        blockmap = cls(path, readonly=readonly)
        try:
            return blockmap, blockmap.read_checkpoint()
        except CorruptionError:
            blockmap.close()
            raise
        except lmdb.Error as error:
            blockmap.close()
            raise CorruptionError(f"the block map is not a readable LMDB file ({error})", path) from None

    def _check_file_size(self):
        """LMDB maps its file: a page past the end of a truncated file kills the process
        with SIGBUS. The meta pages say how many pages there must be; check before any is
        touched."""
        info = self.env.info()
        page_size = self.env.stat()["psize"]
        needed = (info["last_pgno"] + 1) * page_size
        actual = os.path.getsize(os.path.join(self.path, "data.mdb"))
        if actual < needed:
            self.env.close()
            raise CorruptionError(f"the block map file is cut short ({actual} of {needed} bytes)",
                                  os.path.join(self.path, "data.mdb"))

    # ---- reading -------------------------------------------------------------------
    def read_checkpoint(self):
        raw = self.reader().get(CHECKPOINT_KEY, db=self.meta_db)
        return None if raw is None else checkpoint_format.decode(raw, self.path)

    def read_origins(self):
        """{node: greatest origin sequence received} as of the checkpoint."""
        raw = self.reader().get(ORIGINS_KEY, db=self.meta_db)
        return {} if raw is None else origins_format.decode(raw, self.path)

    def read_origin_stamps(self):
        """{node: greatest COMMIT stamp received from it} as of the checkpoint."""
        raw = self.reader().get(ORIGIN_STAMPS_KEY, db=self.meta_db)
        return {} if raw is None else origins_format.decode(raw, self.path)

    def read_removed_volumes(self):
        """{volume id: stamp of its VOLUME_REMOVE} as of the checkpoint (format/origins.py layout)."""
        raw = self.reader().get(REMOVED_VOLUMES_KEY, db=self.meta_db)
        return {} if raw is None else origins_format.decode(raw, self.path)

    def read_tombstones(self):
        raw = self.reader().get(TOMBSTONES_KEY, db=self.meta_db)
        return [] if raw is None else tombstones_format.decode(raw, self.path)

    def conflicts(self, volume_id):
        """Every recorded conflict of a volume, checkpointed or not, in stamp order: (volume,
        first block, end block, the other write's stamp, the arriving write's stamp)."""
        found = {}
        prefix = volume_id.to_bytes(4, "big")
        if self.conflicts_db is not None:
            cursor = self.reader().cursor(db=self.conflicts_db)
            if cursor.set_range(prefix):
                for raw_key, raw in cursor:
                    if raw_key[:4] != prefix:
                        break
                    found[raw_key] = raw
        for raw_key, raw in self.conflict_puts.items():
            if raw_key[:4] == prefix:
                found[raw_key] = raw
        runs = []
        for raw_key in sorted(found, key=lambda k: (k[4:12], k[12:20])):
            volume, first, end, other, stamp = conflict_format.decode(raw_key, found[raw_key])
            if runs and runs[-1][3:] == (other, stamp) and runs[-1][2] == first:
                runs[-1] = (volume, runs[-1][1], end, other, stamp)  # one range across map groups
            else:
                runs.append((volume, first, end, other, stamp))
        return runs

    def stored_volumes(self):
        cursor = self.reader().cursor(db=self.volumes_db)
        return [json.loads(value) for _, value in cursor]

    def stored_snapshots(self):
        cursor = self.reader().cursor(db=self.snapshots_db)
        return [(int.from_bytes(key[:4], "big"), json.loads(value)) for key, value in cursor]

    def history(self, volume_id, after=0, before=group_map.MAX_U64):
        """[(stamp, bytes_written, node)] of a volume's flush points in [after, before], oldest first."""
        found = {}
        cursor = self.reader().cursor(db=self.history_db)
        prefix = history_format.volume_prefix(volume_id)
        if cursor.set_range(history_format.key(volume_id, after)):
            for raw_key, raw in cursor:
                if raw_key[:4] != prefix:
                    break
                _, stamp, written, node = history_format.decode(raw_key, raw)
                if stamp > before:
                    break
                found[stamp] = (stamp, written, node)
        for raw_key, raw in self.history_puts.items():
            if raw_key[:4] == prefix:
                _, stamp, written, node = history_format.decode(raw_key, raw)
                if after <= stamp <= before:
                    found[stamp] = (stamp, written, node)
        return [found[stamp] for stamp in sorted(found)]

    def last_flush_point(self, volume_id, at_or_before):
        """The stamp of the volume's newest flush point at or before a stamp, or None."""
        best = None
        for raw_key in self.history_puts:
            volume, stamp = history_format.KEY.unpack(raw_key)
            if volume == volume_id and stamp <= at_or_before and (best is None or stamp > best):
                best = stamp
        cursor = self.reader().cursor(db=self.history_db)
        if cursor.set_range(history_format.key(volume_id, at_or_before + 1)):
            if cursor.prev():
                volume, stamp = history_format.KEY.unpack(cursor.key())
                if volume == volume_id and (best is None or stamp > best):
                    best = stamp
        elif cursor.last():
            volume, stamp = history_format.KEY.unpack(cursor.key())
            if volume == volume_id and stamp <= at_or_before and (best is None or stamp > best):
                best = stamp
        return best

    def reader(self):
        """The read transaction for lookups. One is kept open between checkpoints (a new
        one per request costs more than the lookup); py-lmdb opens environments with
        MDB_NOTLS, so threads may use it in turn under the pool lock."""
        if self._read_txn is None:
            self._read_txn = self.env.begin(db=self.groups_db)
            self._cursor = self._read_txn.cursor()
        return self._read_txn

    def drop_reader(self, closing=False):
        if self.readonly and not closing:
            return  # a read-only map keeps the snapshot it was opened with: see __init__
        if self._read_txn is not None:
            self._read_txn.abort()
            self._read_txn = self._cursor = None

    def get(self, txn, volume_id, group):
        """The live state of a group (None: never written)."""
        state = self.overlay.get((volume_id, group))
        if state is not None:
            return state
        return self.stored_state(txn, volume_id, group)

    def stored_state(self, txn, volume_id, group, hlc=None):
        """The newest sealed version of a group, or the newest at or before stamp `hlc`
        (None: never written). A clone falls back to its parent as of its snapshot."""
        sealed = None
        if hlc is not None and self.sealed:
            versions = self.sealed.get((volume_id, group))
            if versions:
                for stamp, _, state in reversed(versions):
                    if stamp <= hlc:
                        sealed = (stamp, state)
                        break
        cursor = self._cursor if txn is self._read_txn else txn.cursor()
        start = group_map.newest_key(volume_id, group) if hlc is None else group_map.key(volume_id, group, hlc, group_map.MAX_U32)
        if cursor.set_range(start):
            raw_key = cursor.key()
            if raw_key[:12] == start[:12]:
                # A sealed version wins unless a checkpointed one is newer (another node's
                # interval sealed late lies before versions already in LMDB).
                if sealed is None or group_map.decode_key(raw_key)[2] > sealed[0]:
                    return group_map.decode_state(cursor.value(), raw_key)
        if sealed is not None:
            return sealed[1]
        parent = self.parents.get(volume_id)
        if parent is not None:
            return self.stored_state(txn, parent[0], group, parent[1] if hlc is None else min(hlc, parent[1]))
        return None

    def groups_in(self, txn, volume_id, first_group, end_group, limit):
        """The first `limit` groups in [first_group, end_group), in order, that have any
        version or overlay state. One seek per group found: holes cost nothing."""
        stored = []
        cursor = txn.cursor()
        group = first_group
        while group < end_group and len(stored) < limit:
            if not cursor.set_range(group_map.newest_key(volume_id, group)):
                break
            key_volume, key_group = group_map.KEY.unpack(cursor.key())[:2]
            if key_volume != volume_id or key_group >= end_group:
                break
            stored.append(key_group)
            group = key_group + 1
        found = set(stored)
        for volume, group in self.overlay:
            if volume == volume_id and first_group <= group < end_group:
                found.add(group)
        parent = self.parents.get(volume_id)
        if parent is not None:
            found.update(self.groups_in(txn, parent[0], first_group, end_group, limit))
        return sorted(found)[:limit]

    # ---- changing ------------------------------------------------------------------
    def update(self, volume_id, group, state, hlc, node):
        key = (volume_id, group)
        if self.undo is not None:
            self.undo.append((key, self.overlay.get(key), self.dirty.get(key)))
        self.overlay[key] = state
        self.dirty[key] = (hlc, node)

    def roll_back(self, undo):
        """Put back the overlay as it was before the changes logged in `undo`."""
        for key, state, stamp in reversed(undo):
            if state is None:
                self.overlay.pop(key, None)
            else:
                self.overlay[key] = state
            if stamp is None:
                self.dirty.pop(key, None)
            else:
                self.dirty[key] = stamp

    def seal(self, stamp, node):
        """A flush point with this stamp: the groups changed since the last one become
        versions, and each volume that changed gets a history entry."""
        overlay = self.overlay
        sealed = self.sealed
        touched = dict.fromkeys(self.written, 0)
        touched.update(self.written)
        for key in self.dirty:
            versions = sealed.get(key)
            if versions is None:
                sealed[key] = [(stamp, node, overlay[key])]
            else:
                versions.append((stamp, node, overlay[key]))
            if key[0] not in touched:
                touched[key[0]] = 0
        self.sealed_count += len(self.dirty)
        for volume_id, written in touched.items():
            raw_key = history_format.key(volume_id, stamp)
            self.history_puts[raw_key] = history_format.encode(raw_key, written, node)
        self.dirty.clear()
        self.written.clear()

    def update_foreign(self, volume_id, group, state, first, count, ref, stamp, before):
        """A record of another node met a group: `state` is the live state it leaves (None:
        unchanged, it lost every block; last writer wins).
        Its versions are made at that node's COMMIT (seal_foreign), not at ours."""
        key = (volume_id, group)
        if state is not None:  # None: it won no block
            self.overlay[key] = state
        self.foreign.setdefault(key, []).append((first, count, ref, stamp, before))

    def seal_foreign(self, stamp, node, tombstones, seen):
        """Another node's flush point (its COMMIT, `stamp`) arrived with its records: each
        group they touched gets a version at `stamp`, made from the version this map holds at
        or before it; versions after it (this node's later flush points, sealed before the
        records arrived) take every block the records win there. So a point in time reads
        the same on every node once every record up to it has arrived. `seen`: {node: stamp}
        the origin had received when it wrote them, for the conflict list."""
        if self.dirty or self.written:
            self.seal(stamp, node)  # what its other records changed (a rollback, on a mirror)
        txn = self.reader()
        sealed = self.sealed
        for key, updates in self.foreign.items():
            volume_id, group = key
            later_versions = self._versions_after(txn, key, stamp)
            later_holes = tombstones.commits_after(volume_id, group, stamp)
            versions = sealed.setdefault(key, [])
            if not later_versions and not later_holes:
                # The usual case (a mirror, a peer that is not behind): the live state, which
                # took the records in log order, is the state at their COMMIT.
                state = self.get(txn, volume_id, group)
                if state is not None:
                    self._put_sealed(versions, stamp, node, state)
                self._note_conflicts(volume_id, group, updates, node, seen)
                continue
            # Arrived late: versions after its COMMIT exist here, or ZEROs over groups that held
            # nothing then (they left no version; the records make one, so they must too).
            state = self._merged(self.stored_state(txn, volume_id, group, stamp), updates,
                                 tombstones.floors(volume_id, group, stamp))
            if state is not None:
                self._put_sealed(versions, stamp, node, state)
            existing = {later: (later_node, later_state) for later, later_node, later_state in later_versions}
            previous = state
            for later in sorted(set(existing) | set(later_holes)):
                later_node, base = existing.get(later, (later_holes.get(later), previous))
                fixed = self._merged(base, updates, tombstones.floors(volume_id, group, later))
                if fixed is not None and (fixed is not base or later not in existing):
                    self._put_sealed(versions, later, later_node, fixed)
                previous = fixed
            self._note_conflicts(volume_id, group, updates, node, seen)
        touched = dict(self.foreign_written)
        for volume_id, _ in self.foreign:
            touched.setdefault(volume_id, 0)
        for volume_id, written in touched.items():
            raw_key = history_format.key(volume_id, stamp)
            self.history_puts[raw_key] = history_format.encode(raw_key, written, node)
        self.foreign.clear()
        self.foreign_written.clear()

    @staticmethod
    def _merged(state, updates, floors):
        for first, count, ref, record_stamp, _ in updates:
            state = group_map.merge(state, first, count, ref, record_stamp, floors)[0]
        return group_map.enforce_holes(state, floors)

    def _put_sealed(self, versions, stamp, node, state):
        """Put a version in a group's sealed list (oldest first), replacing one of that stamp."""
        if not versions or versions[-1][0] < stamp:
            versions.append((stamp, node, state))
            self.sealed_count += 1
            return
        for index, (existing, existing_node, _) in enumerate(versions):
            if (existing, existing_node) == (stamp, node):
                versions[index] = (stamp, node, state)
                return
            if existing > stamp:
                versions.insert(index, (stamp, node, state))
                self.sealed_count += 1
                return
        versions.append((stamp, node, state))
        self.sealed_count += 1

    def _versions_after(self, txn, key, stamp):
        """(stamp, node, state) of every version of a group newer than `stamp`, oldest first,
        sealed or checkpointed (a sealed one hides a checkpointed one of the same stamp)."""
        found = {}
        cursor = txn.cursor()
        start = group_map.newest_key(*key)
        if cursor.set_range(start):
            for raw_key, raw in cursor:
                if raw_key[:12] != start[:12]:
                    break
                _, _, version_stamp, version_node = group_map.decode_key(raw_key)
                if version_stamp <= stamp:
                    break
                found[(version_stamp, version_node)] = group_map.decode_state(raw, raw_key)
        for version_stamp, version_node, state in self.sealed.get(key, ()):
            if version_stamp > stamp:
                found[(version_stamp, version_node)] = state
        return [(version_stamp, version_node, found[(version_stamp, version_node)])
                for version_stamp, version_node in sorted(found)]

    def _note_conflicts(self, volume_id, group, updates, node, seen):
        """Blocks where the record of `node` met what another node wrote without `node`
        having seen it: written concurrently. Kept with both stamps and the winner."""
        origin_index = node_index(node)
        seen_by_index = {node_index(other): other_stamp for other, other_stamp in seen.items()}
        runs = {}
        for first, count, _, record_stamp, before in updates:
            for block in range(first, first + count):
                other = before[block]
                if not other or node_index_of(other) == origin_index:
                    continue
                if other <= seen_by_index.get(node_index_of(other), 0):
                    continue  # the origin had it when it wrote: an overwrite, not a conflict
                runs.setdefault((record_stamp, other), []).append(block)
        base = group * group_map.GROUP_BLOCKS
        for (record_stamp, other), blocks in runs.items():
            start = blocks[0]
            for previous, block in zip(blocks, blocks[1:] + [None]):
                if block != previous + 1:
                    raw_key, raw = conflict_format.encode(volume_id, base + start, base + previous + 1,
                                                          other, record_stamp)
                    self.conflict_puts[raw_key] = raw
                    start = block

    def forget_volume(self, volume_id):
        for key in [key for key in self.overlay if key[0] == volume_id]:
            del self.overlay[key]
            self.dirty.pop(key, None)
        for key in [key for key in self.sealed if key[0] == volume_id]:
            self.sealed_count -= len(self.sealed.pop(key))
        prefix = history_format.volume_prefix(volume_id)
        self.history_puts = {key: value for key, value in self.history_puts.items() if key[:4] != prefix}
        self.snapshot_puts = {key: value for key, value in self.snapshot_puts.items() if key[0] != volume_id}
        self.written.pop(volume_id, None)
        self.parents.pop(volume_id, None)
        self.removed_volumes.append(volume_id)

    def put_volume(self, name, info):
        self.volume_puts[name] = None if info is None else json.dumps(info, sort_keys=True).encode()

    def put_snapshot(self, volume_id, name, info):
        self.snapshot_puts[(volume_id, name)] = None if info is None else json.dumps(info, sort_keys=True).encode()

    def prune(self, volume_id, before, keep):
        """At the next checkpoint, drop the volume's versions and history that no point in
        `keep`, and no point after `before`, needs (see _prune_groups)."""
        self.prunes.append((volume_id, before, tuple(keep)))

    @property
    def unsaved(self):
        """Changes not yet in LMDB: unsealed groups plus sealed versions."""
        return len(self.dirty) + self.sealed_count

    def checkpoint(self, checkpoint, origins=None, origin_stamps=None, tombstones=None, removed_volumes=None):
        """Write sealed versions, volume changes and the checkpoint (with the received
        `origins`) in one synced transaction. The caller has made the log durable up to
        checkpoint.log_address and sealed."""
        if self.dirty:
            raise CorruptionError("checkpoint with unsealed block-map changes (a bug)")
        self.drop_reader()
        try:
            self._write_checkpoint(checkpoint, origins, origin_stamps, tombstones, removed_volumes)
        except lmdb.Error as error:
            if "No space" in str(error) or isinstance(error, lmdb.MapFullError):
                raise OutOfSpaceError(f"no space left for the block map checkpoint ({error})") from None
            raise DeviceFailedError(f"the block map could not be written ({error})") from None
        self.sealed.clear()
        self.sealed_count = 0
        self.history_puts.clear()
        if len(self.overlay) > OVERLAY_CACHE_GROUPS:
            self.overlay.clear()  # else keep it: every state in it is now also in LMDB
        self.removed_volumes.clear()
        self.volume_puts.clear()
        self.snapshot_puts.clear()
        self.prunes.clear()
        self.conflict_puts.clear()

    def _sealed_items(self):
        items = []
        for (volume_id, group), versions in self.sealed.items():
            for stamp, node, state in versions:
                raw_key = group_map.key(volume_id, group, stamp, node)
                items.append((raw_key, group_map.encode_state(state, raw_key)))
        items.sort()
        return items

    def _write_checkpoint(self, checkpoint, origins, origin_stamps, tombstones, removed_volumes):
        with self.env.begin(write=True) as txn:
            if self.sealed:
                txn.cursor(db=self.groups_db).putmulti(self._sealed_items(), overwrite=True)
            if self.history_puts:
                txn.cursor(db=self.history_db).putmulti(sorted(self.history_puts.items()), overwrite=True)
            for volume_id, before, keep in self.prunes:
                self._prune_groups(txn, volume_id, before, keep)
            for volume_id in self.removed_volumes:
                for db in (self.groups_db, self.history_db, self.snapshots_db, self.conflicts_db):
                    self._delete_prefix(txn, db, volume_id.to_bytes(4, "big"))
            for name, value in self.volume_puts.items():
                if value is None:
                    txn.delete(name.encode(), db=self.volumes_db)
                else:
                    txn.put(name.encode(), value, db=self.volumes_db)
            for (volume_id, name), value in self.snapshot_puts.items():
                raw_key = volume_id.to_bytes(4, "big") + name.encode()
                if value is None:
                    txn.delete(raw_key, db=self.snapshots_db)
                else:
                    txn.put(raw_key, value, db=self.snapshots_db)
            if origins:
                txn.put(ORIGINS_KEY, origins_format.encode(origins), db=self.meta_db)
            if origin_stamps:
                txn.put(ORIGIN_STAMPS_KEY, origins_format.encode(origin_stamps), db=self.meta_db)
            if removed_volumes:
                txn.put(REMOVED_VOLUMES_KEY, origins_format.encode(removed_volumes), db=self.meta_db)
            if tombstones is not None and tombstones.changed:
                txn.put(TOMBSTONES_KEY, tombstones_format.encode(tombstones.entries()), db=self.meta_db)
            if self.conflict_puts:
                txn.cursor(db=self.conflicts_db).putmulti(sorted(self.conflict_puts.items()), overwrite=True)
            txn.put(CHECKPOINT_KEY, checkpoint_format.encode(checkpoint), db=self.meta_db)

    @staticmethod
    def _delete_prefix(txn, db, prefix):
        cursor = txn.cursor(db=db)
        if not cursor.set_range(prefix):
            return
        while cursor.key()[:len(prefix)] == prefix:
            if not cursor.delete():
                break

    def _prune_groups(self, txn, volume_id, before, keep):
        """Delete the versions of a volume's groups that no point needs: a version is kept if
        it is newer than `before`, or if it is the newest one at or before `before` or at or
        before a stamp in `keep` (snapshots, clones, retained flush points). Flush-point
        history before `before` goes too, but for the points in `keep`."""
        holds = sorted(set(keep) | {before}, reverse=True)
        prefix = volume_id.to_bytes(4, "big")
        doomed = []
        cursor = txn.cursor(db=self.groups_db)
        if cursor.set_range(prefix):
            group = None
            hold = 0
            for raw_key in cursor.iternext(values=False):
                if raw_key[:4] != prefix:
                    break
                if raw_key[4:12] != group:
                    group, hold = raw_key[4:12], 0  # versions come newest first within a group
                stamp = group_map.MAX_U64 - int.from_bytes(raw_key[12:20], "big")
                needed = stamp > before
                while hold < len(holds) and holds[hold] >= stamp:
                    needed = True  # the newest version at or before that hold
                    hold += 1
                if not needed:
                    doomed.append(raw_key)
        for raw_key in doomed:
            txn.delete(raw_key, db=self.groups_db)
        kept = set(keep)
        doomed = []
        cursor = txn.cursor(db=self.history_db)
        if cursor.set_range(prefix):
            for raw_key in cursor.iternext(values=False):
                if raw_key[:4] != prefix or history_format.KEY.unpack(raw_key)[1] >= before:
                    break
                if history_format.KEY.unpack(raw_key)[1] not in kept:
                    doomed.append(raw_key)
        for raw_key in doomed:
            txn.delete(raw_key, db=self.history_db)

    def stats(self):
        return {"versions": self.reader().stat(self.groups_db)["entries"],
                "index_bytes": self.env.info()["last_pgno"] * self.env.stat()["psize"]}

    def close(self):
        self.drop_reader(closing=True)
        self.env.close()
