"""The block map's stored versions taken whole or per volume, beside the per-request lookups
of index/blockmap.py: space accounting (`versions_of`), compaction and heal (`stored_versions`,
`group_refs`, `replace_addresses`), and the base (format/base.py) written from a snapshot of
the map (`stored`, StoredMap) and loaded into an empty one (`load`).

`StoredVersions` is a part of BlockMap (its base class), kept apart because none of it is on
a request's path; it uses the map's LMDB environment and databases, its overlay and sealed
versions, `reader()` and `drop_reader()`. The LMDB handles stay inside index/.
"""

import lmdb

from chunkvol.errors import DeviceFailedError, OutOfSpaceError
from chunkvol.format import base as base_format
from chunkvol.format import checkpoint as checkpoint_format
from chunkvol.format import group_map

CHECKPOINT_KEY = b"checkpoint"


class StoredVersions:
    """What BlockMap can tell and change about its stored versions as a whole."""

    def versions_of(self, volume_id):
        """Every stored (group, stamp, state) of a volume, checkpointed or sealed: for space
        accounting. One pass over the volume's entries."""
        txn = self.reader()
        cursor = txn.cursor(db=self.groups_db)
        prefix = volume_id.to_bytes(4, "big")
        if cursor.set_range(prefix):
            for raw_key, raw in cursor:
                if raw_key[:4] != prefix:
                    break
                _, group, stamp, _ = group_map.decode_key(raw_key)
                yield group, stamp, group_map.decode_state(raw, raw_key)
        for (volume, group), versions in self.sealed.items():
            if volume == volume_id:
                for stamp, _, state in versions:
                    yield group, stamp, state

    # ---- the whole stored map (compaction, heal, the base: format/base.py) ------------
    def stored_versions(self):
        """(volume_id, group, state) of every stored version, in key order, through one LMDB
        snapshot taken now: safe without the pool lock (right after a checkpoint, it is all)."""
        with self.env.begin(db=self.groups_db) as txn:
            for raw_key, raw in txn.cursor():
                volume_id, group, _, _ = group_map.decode_key(raw_key)
                yield volume_id, group, group_map.decode_state(raw, raw_key)

    def group_refs(self, volume_id, group):
        """The refs of every stored version of one group, newest version first."""
        cursor = self.reader().cursor(db=self.groups_db)
        prefix = group_map.KEY.pack(volume_id, group, 0, 0)[:12]
        if not cursor.set_range(prefix):
            return
        for raw_key, raw in cursor:
            if raw_key[:12] != prefix:
                break
            yield from group_map.decode_state(raw, raw_key)[1]

    def replace_addresses(self, moved):
        """Every stored version that names a record at an address in `moved` ({old: new})
        names the new address instead, in one LMDB transaction: all or nothing. Call it right
        after a checkpoint: the overlay, a cache of states that may name the old addresses,
        is dropped."""
        self.drop_reader()
        try:
            with self.env.begin(write=True) as txn:
                updates = []
                for raw_key, raw in txn.cursor(db=self.groups_db):
                    slots, refs = group_map.decode_state(raw, raw_key)
                    if any(address in moved for address, _, _, _ in refs):
                        refs = tuple((moved.get(address, address), stored_length, hlc, flags)
                                     for address, stored_length, hlc, flags in refs)
                        updates.append((bytes(raw_key), group_map.encode_state((slots, refs), raw_key)))
                for raw_key, value in updates:
                    txn.put(raw_key, value, db=self.groups_db)
        except lmdb.Error as error:
            if "No space" in str(error) or isinstance(error, lmdb.MapFullError):
                raise OutOfSpaceError(f"no space left to update the block map ({error})") from None
            raise DeviceFailedError(f"the block map could not be updated ({error})") from None
        self.overlay.clear()

    def stored(self):
        """The map as last checkpointed, through one LMDB snapshot (a StoredMap): read it
        whole without the pool lock while the pool goes on. Close it."""
        return StoredMap(self)

    def load(self, entries, checkpoint):
        """Fill an empty map from a base: its (db, key, value) entries (format/base.py db
        ids), then `checkpoint`, in one LMDB transaction."""
        databases = self.base_databases()
        self.drop_reader()
        with self.env.begin(write=True) as txn:
            for db_id, key, value in entries:
                txn.put(key, value, db=databases[db_id])
            txn.put(CHECKPOINT_KEY, checkpoint_format.encode(checkpoint), db=self.meta_db)

    def base_databases(self):
        databases = {base_format.DB_GROUPS: self.groups_db, base_format.DB_HISTORY: self.history_db,
                     base_format.DB_VOLUMES: self.volumes_db, base_format.DB_SNAPSHOTS: self.snapshots_db,
                     base_format.DB_META: self.meta_db}
        if self.conflicts_db is not None:
            databases[base_format.DB_CONFLICTS] = self.conflicts_db
        return databases


class StoredMap:
    """A BlockMap as last checkpointed, through one LMDB read snapshot (BlockMap.stored())."""

    def __init__(self, blockmap):
        self.path = blockmap.path
        self.databases = blockmap.base_databases()
        self.meta_db = blockmap.meta_db
        self.txn = blockmap.env.begin()

    def meta(self, key):
        """The bytes stored under a meta key (CHECKPOINT_KEY, ORIGINS_KEY, ...), or None."""
        value = self.txn.get(key, db=self.meta_db)
        return None if value is None else bytes(value)

    def entries(self):
        """(db, key, value) of every entry but meta's (format/base.py db ids)."""
        for db_id, db in sorted(self.databases.items()):
            if db_id != base_format.DB_META:
                for key, value in self.txn.cursor(db=db):
                    yield db_id, bytes(key), bytes(value)

    def close(self):
        self.txn.abort()
