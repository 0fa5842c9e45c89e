"""Stamped holes for last-writer-wins between nodes (format/tombstones.py holds the bytes).

A block map slot that is a hole has no stamp; a tombstone gives it one: the greatest stamp of
a ZERO over the block. It counts for points in time from its flush interval's COMMIT on
(`commit`), as the ZERO itself does; until then only for the live state. Kept only in pools
that take other nodes' records, and only while a peer can still send a record older than it,
or one written without having seen it: `prune` (Pool._prune_tombstones says when)."""

from chunkvol.clock import node_index_of
from chunkvol.format.record import GROUP_BLOCKS


class Tombstones:
    def __init__(self, entries=()):
        # volume -> [[first block, end block, stamp, commit stamp (0: not yet), origin node]]
        self.by_volume = {}
        self.pending = []    # entries whose flush interval has not ended
        self.changed = False
        for volume, first, end, stamp, commit, node in entries:
            self.by_volume.setdefault(volume, []).append([first, end, stamp, commit, node])

    def add(self, volume, first_block, end_block, stamp, node):
        entry = [first_block, end_block, stamp, 0, node]
        self.by_volume.setdefault(volume, []).append(entry)
        self.pending.append((entry, stamp))
        self.changed = True

    def commit(self, origin_index, stamp):
        """The flush interval of node `origin_index` ended at `stamp` (its COMMIT)."""
        if not self.pending:
            return
        kept = []
        for entry, entry_stamp in self.pending:
            if node_index_of(entry_stamp) == origin_index and entry_stamp <= stamp:
                entry[3] = stamp
            else:
                kept.append((entry, entry_stamp))
        self.pending = kept

    def floors(self, volume, group, at_most=None):
        """Per block of the group, the greatest tombstone stamp over it (at or before
        `at_most`), or None when no tombstone touches the group."""
        entries = self.by_volume.get(volume)
        if not entries:
            return None
        start = group * GROUP_BLOCKS
        end = start + GROUP_BLOCKS
        floors = None
        for first, last, stamp, commit, _ in entries:
            if last <= start or first >= end or (at_most is not None and not 0 < commit <= at_most):
                continue
            if floors is None:
                floors = [0] * GROUP_BLOCKS
            for block in range(max(first, start) - start, min(last, end) - start):
                if stamp > floors[block]:
                    floors[block] = stamp
        return floors

    def commits_after(self, volume, group, stamp):
        """{commit stamp: origin node} of the ended tombstones over the group after `stamp`."""
        start = group * GROUP_BLOCKS
        return {commit: node for first, last, _, commit, node in self.by_volume.get(volume, ())
                if commit > stamp and last > start and first < start + GROUP_BLOCKS}

    def drop(self, volume, which):
        """Drop the volume's tombstones for which `which(entry)` is true."""
        entries = self.by_volume.get(volume)
        if entries:
            kept = [entry for entry in entries if not which(entry)]
            if len(kept) != len(entries):
                self.by_volume[volume] = kept
                self.changed = True

    def forget_volume(self, volume):
        if self.by_volume.pop(volume, None):
            self.changed = True

    def origins(self):
        return {entry[4] for entries in self.by_volume.values() for entry in entries}

    def prune(self, horizon):
        """Drop the ended tombstones stamped at or before `horizon`: no record can lose to
        them or conflict with them any more."""
        for volume in list(self.by_volume):
            kept = [entry for entry in self.by_volume[volume] if not entry[3] or entry[2] > horizon]
            if len(kept) != len(self.by_volume[volume]):
                self.changed = True
                if kept:
                    self.by_volume[volume] = kept
                else:
                    del self.by_volume[volume]

    def entries(self):
        return [(volume, first, end, stamp, commit, node) for volume, items in sorted(self.by_volume.items())
                for first, end, stamp, commit, node in items]
