"""Two (or more) writing nodes of one pool in one process, and an oracle that knows nothing of
chunkvol's block map.

`Node` is a pool in a directory with its peers named in mirrors.json; `ship` moves an origin's
flush intervals from one node's log (read back from its chunk files, as the shipper does) to
another through the receiver, all of them or only the first few, as a lagging link would.

`Oracle` reads every node's own records straight from its chunk files and replays them with
the per-block rule: a flush interval is visible at stamp T when its COMMIT's stamp is at or
before T; per block, the visible EXTENT or ZERO with the greatest stamp wins. It also replays
each node's log in that node's order to list the conflicts that node must report: a record
meeting a block last written by another node that the record's origin had not seen (per the
seen stamps its COMMIT carries), unless both are zeroes.
"""

import json
import time

import zstandard

from chunkvol.clock import new_node_id, node_index_of
from chunkvol.format import record
from chunkvol.format.chunk_header import DATA_OFFSET, address
from chunkvol.format.record import BLOCK_SIZE, CHECKSUM_BYTES, FLAG_ZSTD, HEADER_SIZE, RecordType, commit_seen
from chunkvol.mirror import config as mirror_config
from chunkvol.mirror import receiver
from chunkvol.mirror.source import LogSource
from chunkvol.pool import Pool
from chunkvol.storage.files import LocalFiles

MiB = 1 << 20


class Node:
    def __init__(self, path, pool_uuid=None, taken=(), wall=None):
        self.path = path
        node_id = new_node_id(taken) if pool_uuid is not None else None
        Pool.create(path, chunk_size=16 * MiB, node_id=node_id, pool_uuid=pool_uuid)
        self.fields = Pool.read_metadata(path)
        self.node_id = self.fields["node_id"]
        self.pool_uuid = bytes.fromhex(self.fields["pool_uuid"])
        self.cursors = {}  # other node -> our log address shipped up to
        self.wall = wall
        self.pool = None

    def open(self, files=None):
        self.pool = Pool.open(self.path, wall=self.wall, files=files)
        return self

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def peer_with(self, others):
        mirrors = {f"n{other.node_id}": {"to": f"node:127.0.0.1:{1000 + index}", "bandwidth": None,
                                         "added": "2026-11-25T00:00:00Z", "peer": True, "node": other.node_id}
                   for index, other in enumerate(others)}
        mirror_config.save_mirrors(self.path, mirrors)


def ship(source, target, batches=None, duplicate=False):
    """Ship `source`'s own flush intervals to `target` (the first `batches` of them, or all);
    `duplicate`: send each batch twice, as after a lost acknowledgement."""
    source.pool.flush()
    horizon = source.pool.writer.durable_address
    held = receiver.have(target.pool, source.node_id)
    log = LogSource(source.path, source.fields, LocalFiles())
    cursor = source.cursors.get(target.node_id, address(1, DATA_OFFSET))
    sent = 0
    try:
        for batch in log.batches(cursor, horizon, 256 << 10, skip_through=held):
            if batches is not None and sent >= batches:
                break
            if batch.records:
                for _ in range(2 if duplicate else 1):
                    receiver.receive(target.pool, source.pool_uuid, source.node_id, batch.records)
                sent += 1
            cursor = batch.end
    finally:
        log.close()
    source.cursors[target.node_id] = cursor
    return sent


def contents(node, volume_names=None):
    """{point: bytes} of every volume and snapshot of a node."""
    found = {}
    pool = node.pool
    for name in sorted(volume_names or pool.volumes):
        info = pool.volumes[name]
        points = [name] + [f"{name}@{snapshot}" for snapshot in sorted(pool.snapshots.get(info.volume_id, {}))]
        for point in points:
            volume = pool.volume(point, readonly=True)
            buffer = bytearray(volume.size_bytes)
            volume.read(buffer, 0)
            found[point] = bytes(buffer)
    return found


class Oracle:
    """Replays the nodes' own records with the per-block rule (see the module docstring)."""

    def __init__(self, nodes):
        self.records = {}     # origin -> [(stamp, kind, volume name, first block, blocks, commit stamp)]
        self.data = {}        # (origin, sequence) -> bytes of an EXTENT's blocks
        self.volumes = {}     # volume id -> (name, size)
        self.snapshots = {}   # (volume name, snapshot name) -> stamp
        self.created = {}     # volume id -> stamp of its VOLUME_CREATE
        for node in nodes:
            self._read(node)
        # One name created on two nodes apart: the older keeps it, the newer is NAME.nodeN.
        by_name = {}
        for volume_id in sorted(self.volumes, key=lambda v: (self.created[v], v)):
            name, size = self.volumes[volume_id]
            if name in by_name:
                self.volumes[volume_id] = (f"{name}.node{node_index_of(self.created[volume_id])}", size)
            by_name.setdefault(name, volume_id)

    def _walk(self, node):
        log = LogSource(node.path, node.fields, LocalFiles())
        try:
            ids = log.chunks.ids()
            last = log.chunks.get(ids[-1])
            for position, header, raw in log.walk(address(ids[0], DATA_OFFSET), address(ids[-1], last.size_bytes)):
                yield position, header, bytes(raw)
        finally:
            log.close()

    def _read(self, node):
        pending = []
        own = self.records.setdefault(node.node_id, [])
        for _, header, raw in self._walk(node):
            kind, flags, volume_id, _, origin, sequence, stamp, offset, length, _ = header
            if origin != node.node_id or flags & record.FLAG_RELOCATED:
                continue
            payload = raw[HEADER_SIZE:]
            if kind == RecordType.VOLUME_CREATE:
                description = json.loads(payload)
                self.volumes[volume_id] = (description["name"], description["size"])
                self.created[volume_id] = stamp
            elif kind == RecordType.SNAPSHOT:
                description = json.loads(payload)
                if description["op"] == "create":
                    self.snapshots[(self.volumes[volume_id][0], description["name"])] = stamp
            elif kind in (RecordType.EXTENT, RecordType.ZERO):
                if kind == RecordType.EXTENT:
                    if flags & FLAG_ZSTD:
                        blocks = zstandard.ZstdDecompressor().decompress(payload, max_output_size=length)
                    else:
                        count = length // BLOCK_SIZE
                        body = payload[count * CHECKSUM_BYTES:]
                        blocks = body
                    self.data[(origin, sequence)] = blocks
                pending.append([stamp, kind, volume_id, offset // BLOCK_SIZE, length // BLOCK_SIZE, sequence])
            elif kind == RecordType.COMMIT:
                for item in pending:
                    own.append(tuple(item) + (stamp,))
                pending = []

    def volume_at(self, volume_id, at=None):
        """The bytes of a volume as of stamp `at` (None: everything)."""
        name, size = self.volumes[volume_id]
        winners = {}
        for origin, items in self.records.items():
            for stamp, kind, volume, first, count, sequence, commit in items:
                if volume != volume_id or (at is not None and commit > at):
                    continue
                for block in range(first, first + count):
                    if block not in winners or stamp > winners[block][0]:
                        winners[block] = (stamp, kind, origin, sequence, block - first)
        out = bytearray(size)
        for block, (_, kind, origin, sequence, within) in winners.items():
            if kind == RecordType.EXTENT:
                out[block * BLOCK_SIZE:(block + 1) * BLOCK_SIZE] = \
                    self.data[(origin, sequence)][within * BLOCK_SIZE:(within + 1) * BLOCK_SIZE]
        return bytes(out)

    def expected(self):
        """{point: bytes} for every volume and snapshot, as `contents` gives them."""
        found = {}
        for volume_id, (name, _) in self.volumes.items():
            found[name] = self.volume_at(volume_id)
            for (volume_name, snapshot), stamp in self.snapshots.items():
                if volume_name == name:
                    found[f"{name}@{snapshot}"] = self.volume_at(volume_id, stamp)
        return found

    def conflicts(self, node):
        """[(volume id, first block, end block, other stamp, stamp)] node must report: its log
        replayed in its own order."""
        owner = {}   # (volume, block) -> (stamp, kind) of what it holds
        found = set()
        pending = []
        for _, header, raw in self._walk(node):
            kind, flags, volume_id, _, origin, _, stamp, offset, length, _ = header
            if flags & record.FLAG_RELOCATED:
                continue
            if kind in (RecordType.EXTENT, RecordType.ZERO):
                if origin == node.node_id:
                    for block in range(offset // BLOCK_SIZE, (offset + length) // BLOCK_SIZE):
                        owner[(volume_id, block)] = max(owner.get((volume_id, block), (0, 0)), (stamp, kind))
                else:
                    pending.append((stamp, kind, volume_id, offset // BLOCK_SIZE, length // BLOCK_SIZE))
            elif kind == RecordType.COMMIT and origin != node.node_id:
                seen = {node_index_of_id(other): value for other, value in commit_seen(raw[HEADER_SIZE:]).items()}
                for record_stamp, kind, volume_id, first, count in pending:
                    for block in range(first, first + count):
                        before, before_kind = owner.get((volume_id, block), (0, 0))
                        both_zero = kind == before_kind == RecordType.ZERO
                        if (before and not both_zero and node_index_of(before) != node_index_of(record_stamp)
                                and before > seen.get(node_index_of(before), 0)):
                            found.add((volume_id, block, before, record_stamp))
                        owner[(volume_id, block)] = max((before, before_kind), (record_stamp, kind))
                pending = []
        return _runs(found)


def node_index_of_id(node_id):
    return node_id & 0xF


def _runs(blocks):
    """Adjacent blocks with the same stamps as (volume, first, end, other, stamp) ranges."""
    runs = []
    for volume_id, block, other, stamp in sorted(blocks, key=lambda b: (b[0], b[3], b[2], b[1])):
        if runs and runs[-1][0] == volume_id and runs[-1][3:] == (other, stamp) and runs[-1][2] == block:
            runs[-1] = (volume_id, runs[-1][1], block + 1, other, stamp)
        else:
            runs.append((volume_id, block, block + 1, other, stamp))
    return sorted(runs)


def random_ops(node, volume_name, rng, count, region=None):
    """Writes, zeroes and flushes of a node; `region`: (first, end) bytes it keeps to."""
    volume = node.pool.volume(volume_name)
    first, end = region or (0, volume.size_bytes)
    for _ in range(count):
        choice = rng.random()
        size = rng.choice([4096, 8192, 65536, 3 * 4096, 200_000])
        offset = rng.randrange(first, end - size) // BLOCK_SIZE * BLOCK_SIZE
        if choice < 0.8:
            volume.write(rng.randbytes(size), offset)
        elif choice < 0.9:
            volume.zero(offset, size // BLOCK_SIZE * BLOCK_SIZE or BLOCK_SIZE)
        else:
            node.pool.flush()
    node.pool.flush()


class SimulatedTime:
    """One shared wall clock for a simulation, moved by a seeded random step at every reading;
    each node may see it skewed (ahead, behind) or jumping back (`jump`)."""

    def __init__(self, rng, start_ns=None, max_step_ns=3_000_000):
        self.rng = rng
        # From a whole minute of now, so that seeds replay alike and retention sees recent history.
        self.now_ns = start_ns if start_ns is not None else time.time_ns() // 60_000_000_000 * 60_000_000_000
        self.max_step_ns = max_step_ns
        self.skews = {}

    def wall_for(self, key, skew_ns=0):
        self.skews[key] = skew_ns

        def wall():
            self.now_ns += self.rng.randrange(0, self.max_step_ns)
            return self.now_ns + self.skews[key]
        return wall

    def jump(self, key, by_ns):
        self.skews[key] += by_ns


def pool_pair(tmp_path, count=2, walls=None):
    """`count` writing nodes of one pool, each a peer of every other, open."""
    first = Node(str(tmp_path / "n0"), wall=(walls or [None] * count)[0])
    nodes = [first]
    for index in range(1, count):
        nodes.append(Node(str(tmp_path / f"n{index}"), pool_uuid=first.pool_uuid,
                          taken=[node.node_id for node in nodes], wall=(walls or [None] * count)[index]))
    for node in nodes:
        node.peer_with([other for other in nodes if other is not node])
    return [node.open() for node in nodes]

