"""BlockMap: (volume, block) -> versions -> where each version's record lives.

A derived cache of the log, kept in LMDB (measured ~4x faster than SQLite for lookups here).
Every version of a 64 KiB map group is one entry (format/group_map.py), so the live state is
one seek (the newest version) and so is any past flush point (the newest version at or before
its stamp), however deep the history.

Writes do not touch LMDB. They change an in-memory overlay of group states; at each flush
point the groups changed since the previous one are sealed into versions; a checkpoint writes
the sealed versions and the log address they reflect in one synced LMDB transaction. The
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

from chunkvol.errors import CorruptionError, DeviceFailedError, OutOfSpaceError
from chunkvol.format import checkpoint as checkpoint_format
from chunkvol.format import group_map

MAP_SIZE_BYTES = 1 << 40  # address space only; the file grows as needed
CHECKPOINT_KEY = b"checkpoint"
OVERLAY_CACHE_GROUPS = 16384  # checkpointed group states kept in memory (a few tens of MiB)


class BlockMap:
    def __init__(self, path, readonly=False):
        self.path = path
        if not readonly:
            os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(path, map_size=MAP_SIZE_BYTES, subdir=True, max_dbs=4,
                                 readonly=readonly, readahead=False, meminit=False, create=not readonly)
        except lmdb.Error as error:
            raise CorruptionError(f"the block map is not a readable LMDB file ({error})", path) from None
        self.readonly = readonly
        self._check_file_size()
        self.groups_db = self.env.open_db(b"groups", create=not readonly)
        self.meta_db = self.env.open_db(b"meta", create=not readonly)
        self.volumes_db = self.env.open_db(b"volumes", create=not readonly)
        self.overlay = {}        # (volume_id, group) -> state, changed since the last checkpoint
        self.dirty = {}          # (volume_id, group) -> (hlc, node) changed since the last seal
        self.pending = []        # sealed (key, value) versions not yet in LMDB
        self.removed_volumes = []  # volume ids whose versions go at the next checkpoint
        self.volume_puts = {}    # name -> JSON bytes (None: delete) for the next checkpoint
        self._read_txn = None
        self._cursor = None
        self.undo = None  # during a client request: (key, state, stamp) before each change

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

    def stored_volumes(self):
        cursor = self.reader().cursor(db=self.volumes_db)
        return [json.loads(value) for _, value in cursor]

    def reader(self):
        """The read transaction for lookups. One is kept open between checkpoints (a new
        one per request costs more than the lookup); py-lmdb opens environments with
        MDB_NOTLS, so threads may use it in turn under the pool lock."""
        if self._read_txn is None:
            self._read_txn = self.env.begin(db=self.groups_db)
            self._cursor = self._read_txn.cursor()
        return self._read_txn

    def _drop_reader(self, closing=False):
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
        """The newest checkpointed version of a group, or the newest at or before stamp `hlc`."""
        cursor = self._cursor if txn is self._read_txn else txn.cursor()
        start = group_map.newest_key(volume_id, group) if hlc is None else group_map.key(volume_id, group, hlc, group_map.MAX_U32)
        if not cursor.set_range(start):
            return None
        raw_key = cursor.key()
        if raw_key[:12] != start[:12]:
            return None
        return group_map.decode_state(cursor.value(), raw_key)

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

    def seal(self):
        """A flush point: the groups changed since the last one become versions."""
        overlay = self.overlay
        pending = self.pending
        for key, (hlc, node) in self.dirty.items():
            raw_key = group_map.key(key[0], key[1], hlc, node)
            pending.append((raw_key, group_map.encode_state(overlay[key], raw_key)))
        self.dirty.clear()

    def forget_volume(self, volume_id):
        for key in [key for key in self.overlay if key[0] == volume_id]:
            del self.overlay[key]
            self.dirty.pop(key, None)
        self.pending = [(key, value) for key, value in self.pending
                        if group_map.KEY.unpack(key)[0] != volume_id]
        self.removed_volumes.append(volume_id)

    def put_volume(self, name, info):
        self.volume_puts[name] = None if info is None else json.dumps(info, sort_keys=True).encode()

    @property
    def unsaved(self):
        """Changes not yet in LMDB: unsealed groups plus sealed versions."""
        return len(self.dirty) + len(self.pending)

    def checkpoint(self, checkpoint):
        """Write sealed versions, volume changes and the checkpoint in one synced transaction.
        The caller has made the log durable up to checkpoint.log_address and sealed."""
        if self.dirty:
            raise CorruptionError("checkpoint with unsealed block-map changes (a bug)")
        self._drop_reader()
        try:
            self._write_checkpoint(checkpoint)
        except lmdb.Error as error:
            if "No space" in str(error) or isinstance(error, lmdb.MapFullError):
                raise OutOfSpaceError(f"no space left for the block map checkpoint ({error})") from None
            raise DeviceFailedError(f"the block map could not be written ({error})") from None
        self.pending = []
        if len(self.overlay) > OVERLAY_CACHE_GROUPS:
            self.overlay.clear()  # else keep it: every state in it is now also in LMDB
        self.removed_volumes.clear()
        self.volume_puts.clear()

    def _write_checkpoint(self, checkpoint):
        with self.env.begin(write=True) as txn:
            if self.pending:
                self.pending.sort()
                txn.cursor(db=self.groups_db).putmulti(self.pending, overwrite=True)
            for volume_id in self.removed_volumes:
                self._delete_volume_versions(txn, volume_id)
            for name, value in self.volume_puts.items():
                if value is None:
                    txn.delete(name.encode(), db=self.volumes_db)
                else:
                    txn.put(name.encode(), value, db=self.volumes_db)
            txn.put(CHECKPOINT_KEY, checkpoint_format.encode(checkpoint), db=self.meta_db)

    def _delete_volume_versions(self, txn, volume_id):
        cursor = txn.cursor(db=self.groups_db)
        prefix = volume_id.to_bytes(4, "big")
        if not cursor.set_range(prefix):
            return
        while cursor.key()[:4] == prefix:
            if not cursor.delete():
                break

    def stats(self):
        return {"versions": self.reader().stat(self.groups_db)["entries"],
                "index_bytes": self.env.info()["last_pgno"] * self.env.stat()["psize"]}

    def close(self):
        self._drop_reader(closing=True)
        self.env.close()
