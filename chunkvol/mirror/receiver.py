"""A pool takes a batch of another node's records: checked whole, appended to its own log with
their origin (node, sequence, stamp) unchanged, synced, then applied exactly as replay applies
them, so a rebuilt block map is the same as the live one.

A batch is what the origin's log holds between two flush points, ending with the COMMIT of
the second: applied whole, the mirror has the origin's flush points and nothing between them.
Records whose sequence this pool already has are skipped (a resent batch after a lost ack),
so nothing is applied twice. Anything a node of this pool would never send (another pool's
records, records in this node's own name, a broken or forged record, a batch that does not
end at a flush point, a volume record that would not replay) refuses the whole batch with
PeerError before anything is written. So do a stamp whose low bits are not the origin's node
index, a new volume id outside the origin's range, and a stamp more than the pool's allowed
clock skew (pool.json `max_clock_skew_seconds`, default 60) ahead of this node's clock.

A COMMIT keeps its stamp but its payload (the durable address, a fact about the log that
holds it) is rewritten for this log: the address up to which this log was synced when it
was appended, so recovery's durability proofs stay true here.
"""

import json

import zstandard

from chunkvol.clock import COUNTER_BITS, hlc_to_seconds, node_index, node_index_of
from chunkvol.errors import CorruptionError, PeerError, ReadOnlyError, UsageError
from chunkvol.format import record
from chunkvol.format.record import (BLOCK_SIZE, CHECKSUM_BYTES, COMMIT_PAYLOAD, commit_payload_valid, FLAG_MORE, FLAG_TRIM, FLAG_ZSTD,
                                    GROUP_SIZE, HEADER_SIZE, SHIPPED_TYPES, RecordType)
from chunkvol.pool.volumes import (COMPRESSIONS, VOLUME_ID_NODE_SHIFT, VOLUME_MODES, check_volume_size,
                                   validate_volume_name)

DEFAULT_MAX_CLOCK_SKEW_SECONDS = 60
ALLOWED_FLAGS = FLAG_ZSTD | FLAG_TRIM | FLAG_MORE
MAX_BATCH_RECORDS = 1 << 20


def have(pool, origin):
    """The greatest sequence of `origin`'s records this pool holds (0: none)."""
    with pool.lock:
        return pool.origins.get(origin, 0)


def check_origin(pool, pool_uuid, origin):
    """PeerError unless a batch of pool `pool_uuid` from `origin` may come to `pool` (anything
    with `pool_uuid` and `node_id`: a Pool, or a target that holds records in memory)."""
    if pool_uuid != pool.pool_uuid:
        raise PeerError(f"records of another pool ({pool_uuid.hex()}; this is {pool.pool_uuid.hex()})")
    if origin == pool.node_id:
        raise PeerError(f"records in this node's own name ({origin})")


def receive(pool, pool_uuid, origin, raw_records):
    """Check, append, sync and apply one batch of `origin`'s records (each the bytes of one
    whole record, header and payload); returns the greatest sequence now held from it."""
    check_origin(pool, pool_uuid, origin)
    if pool.readonly:
        raise ReadOnlyError("the pool is open read-only; it cannot take records")
    with pool.lock:
        held = pool.origins.get(origin, 0)
        records, _ = checked(origin, held, raw_records, Catalogue.of(pool))
        if not records:
            return held
        if pool.blockmap.dirty or pool.blockmap.written:
            pool.flush_point()  # this node's own writes get their own flush point first
        writer = pool.writer
        ours_flushed = pool.committed_address == writer.position  # nothing of ours after our last COMMIT
        mark = writer.mark()
        addresses = []
        try:
            for header, payload in records:
                addresses.append(_append(writer, header, payload))
            writer.sync()
        except BaseException:
            try:
                writer.roll_back(mark)
            except OSError as error:
                writer.fail(error)
            raise
        for address, (header, payload) in zip(addresses, records):
            _apply(pool, address, header, payload)
        last_header, _ = records[-1]
        pool.origins[origin] = last_header.origin_sequence
        if ours_flushed:
            # The batch ends at the origin's COMMIT, rewritten to this log's synced address: a
            # flush point here too, so no COMMIT of ours is owed for it (else peers ping-pong
            # them). Records of ours before it (a snapshot) still get theirs.
            pool.committed_address = writer.position
        pool.checkpoint_if_due()
        return pool.origins[origin]


def _append(writer, header, payload):
    record_type, flags, volume_id, stored, node, sequence, hlc, offset, length, _ = header
    if record_type == RecordType.COMMIT:
        payload = COMMIT_PAYLOAD.pack(writer.durable_address) + bytes(payload[COMMIT_PAYLOAD.size:])
    elif record_type == RecordType.EXTENT and not flags & FLAG_ZSTD:
        table_bytes = length // BLOCK_SIZE * CHECKSUM_BYTES
        return writer.append(record_type, flags, volume_id, payload[table_bytes:], node, sequence, hlc,
                             offset, length, table=payload[:table_bytes])
    return writer.append(record_type, flags, volume_id, payload, node, sequence, hlc, offset, length)


def _apply(pool, address, header, payload):
    pool.apply_record(address, header, payload, checkpoint=False)  # the caller checkpoints after


class Catalogue:
    """What checking a batch needs to know of the pool it goes to: its volumes (id -> size,
    the names, the ids removed) and its clock (this node's wall time, the skew allowed).
    `checked` works on a copy and returns the catalogue as the batch leaves it, so a refused
    batch changes nothing, and a target that keeps records in memory keeps it as its state."""

    def __init__(self, sizes, names, removed, wall_ns, skew_seconds=DEFAULT_MAX_CLOCK_SKEW_SECONDS):
        self.sizes = dict(sizes)
        self.names = set(names)
        self.removed = set(removed)
        self.wall_ns = wall_ns
        self.skew_seconds = skew_seconds

    @classmethod
    def of(cls, pool):
        return cls({volume_id: info.size_bytes for volume_id, info in pool.volumes_by_id.items()},
                   {info.name for info in pool.volumes_by_id.values()}, pool.removed_volumes, pool.clock.wall(),
                   pool.fields.get("max_clock_skew_seconds", DEFAULT_MAX_CLOCK_SKEW_SECONDS))

    def copy(self):
        return Catalogue(self.sizes, self.names, self.removed, self.wall_ns, self.skew_seconds)

    def latest_stamp(self):
        """The greatest stamp a record may carry here: this node's wall clock plus the skew
        the pool allows (pool.json `max_clock_skew_seconds`). A peer whose clock runs far
        ahead would otherwise drag every node's clock, and its wall-time points, along with
        it; a stamp near 2^64 would leave no stamp for any later write."""
        return (((self.wall_ns // 1_000_000 + int(self.skew_seconds * 1000)) << COUNTER_BITS)
                | ((1 << COUNTER_BITS) - 1))


def checked(origin, held, raw_records, catalogue=None):
    """([(header, payload)] of the records after `held`, the catalogue as they leave it), or
    PeerError. Without a `catalogue`, only the rules a batch carries in itself are checked
    (checksums, origin, stamps' node index, types and flags, order, the closing COMMIT): what
    an object store, which applies nothing, can know."""
    if not raw_records or len(raw_records) > MAX_BATCH_RECORDS:
        raise PeerError(f"a batch of {len(raw_records)} records")
    if catalogue is not None:
        catalogue = catalogue.copy()
        sizes, names, removed = catalogue.sizes, catalogue.names, catalogue.removed
        latest = catalogue.latest_stamp()
    records = []
    last_sequence = last_type = last_flags = 0
    for index, raw in enumerate(raw_records):
        where = f"record {index} of the batch"
        raw = memoryview(raw)
        try:
            header = record.decode_header(raw[:HEADER_SIZE])
            payload = bytes(raw[HEADER_SIZE:])
            record.verify_payload(header, payload)
        except CorruptionError as error:
            raise PeerError(f"{where}: {error}") from None
        record_type, flags, volume_id, stored, node, sequence, hlc, offset, length, _ = header
        if node != origin:
            raise PeerError(f"{where} names origin {node}, the batch {origin}")
        if node_index_of(hlc) != node_index(origin):
            raise PeerError(f"{where}: its stamp carries node index {node_index_of(hlc)}, not its origin's "
                            f"({node_index(origin)}): two nodes with one index, or a forgery")
        if catalogue is not None and hlc > latest:
            ahead = hlc_to_seconds(hlc) - catalogue.wall_ns / 1e9
            raise PeerError(f"{where}: its stamp is {ahead:.0f}s ahead of this node's clock, more than the "
                            f"{catalogue.skew_seconds}s allowed: one of the two clocks is wrong (NTP?)")
        if record_type not in SHIPPED_TYPES or flags & ~ALLOWED_FLAGS:
            raise PeerError(f"{where}: type {record_type} with flags {flags} is never shipped")
        if sequence <= last_sequence:
            raise PeerError(f"{where}: sequence {sequence} does not follow {last_sequence}")
        if last_flags & FLAG_MORE and record_type not in (RecordType.EXTENT, RecordType.ZERO):
            raise PeerError(f"{where}: a request's records are cut by a {RecordType(record_type).name}")
        last_flags = flags
        last_sequence, last_type = sequence, record_type
        if sequence <= held:
            continue  # this pool has it (a resend after a lost acknowledgement)
        creator = volume_id >> VOLUME_ID_NODE_SHIFT
        if record_type == RecordType.VOLUME_CREATE and creator != node_index(origin):
            raise PeerError(f"{where}: volume id {volume_id} is in node index {creator}'s range, not its "
                            f"origin's ({node_index(origin)})")
        if catalogue is None:
            records.append((header, payload))
            continue
        try:
            _check_fields(header, payload, sizes, names, removed)
        except (ValueError, TypeError, KeyError, UsageError, zstandard.ZstdError) as error:
            raise PeerError(f"{where} ({RecordType(record_type).name} of volume {volume_id}): {error}") from None
        records.append((header, payload))
    if last_type != RecordType.COMMIT:
        raise PeerError("the batch does not end at a flush point (COMMIT)")
    return records, catalogue


def _check_fields(header, payload, sizes, names, removed):
    """Raise ValueError unless the record would replay here exactly as at its origin. Records
    of a volume removed here (`removed`: written elsewhere while apart) are taken: applying
    them drops them, as on every node (docs/MULTIMASTER.md)."""
    record_type, flags, volume_id, stored, node, sequence, hlc, offset, length, _ = header
    if record_type in (RecordType.EXTENT, RecordType.ZERO):
        if volume_id in removed:
            return
        if volume_id not in sizes:
            raise ValueError("no such volume here")
        if offset % BLOCK_SIZE or length % BLOCK_SIZE or not length or offset + length > sizes[volume_id]:
            raise ValueError(f"range {offset}+{length} is not whole blocks inside the volume")
        if record_type == RecordType.EXTENT:
            if offset // GROUP_SIZE != (offset + length - 1) // GROUP_SIZE:
                raise ValueError("an extent crosses a map group")
            if flags & FLAG_ZSTD and zstandard.get_frame_parameters(payload).content_size != length:
                raise ValueError("zstd frame's declared size is not the record's length")
        elif stored:
            raise ValueError("a ZERO record carries a payload")
        return
    if record_type == RecordType.COMMIT:
        if not commit_payload_valid(stored) or volume_id:
            raise ValueError("malformed COMMIT")
        return
    description = json.loads(payload)
    if not isinstance(description, dict):
        raise ValueError("payload is not a JSON object")
    if record_type == RecordType.VOLUME_CREATE:
        validate_volume_name(description["name"])
        check_volume_size(description["size"])
        if description["compression"] not in COMPRESSIONS or volume_id in sizes:
            raise ValueError("volume exists already or has an unknown compression")
        if volume_id in removed:
            return  # removed by another node before its creation reached this one
        if description.get("mode") not in (None,) + VOLUME_MODES or not (
                description.get("primary") is None or isinstance(description["primary"], int)):
            raise ValueError("unknown volume mode or primary")
        parent = description.get("parent")
        if parent is not None and (not isinstance(parent, dict) or parent.get("id") not in sizes
                                   or not isinstance(parent.get("stamp"), int)):
            raise ValueError("clone of an unknown parent")
        sizes[volume_id] = description["size"]
        names.add(description["name"])
        return
    if volume_id in removed:
        return
    if volume_id not in sizes:
        raise ValueError("no such volume here")
    if record_type == RecordType.VOLUME_RESIZE:
        # Sizes set on two nodes apart: the greatest wins, so a smaller one is taken (no-op).
        sizes[volume_id] = max(sizes[volume_id], check_volume_size(description["size"]))
    elif record_type == RecordType.VOLUME_REMOVE:
        del sizes[volume_id]
        removed.add(volume_id)
    elif record_type == RecordType.VOLUME_PRIMARY:
        if not isinstance(description["primary"], int) or description["primary"] != node:
            raise ValueError("a node promotes only itself")
        seen = description.get("seen", {})
        if not isinstance(seen, dict) or not all(key.isdigit() and isinstance(value, int)
                                                 for key, value in seen.items()):
            raise ValueError("malformed seen stamps")
    elif record_type == RecordType.SNAPSHOT:
        if description["op"] not in ("create", "remove") or not isinstance(description["name"], str):
            raise ValueError("malformed snapshot record")
        if description["op"] == "create" and not (isinstance(description["size"], int)
                                                  and isinstance(description["created"], str)):
            raise ValueError("malformed snapshot record")
    elif record_type == RecordType.ROLLBACK:
        if not isinstance(description["stamp"], int):
            raise ValueError("malformed rollback record")
    elif record_type == RecordType.PRUNE:
        if not (isinstance(description["before"], int) and isinstance(description["retained_from"], int)
                and isinstance(description["keep"], list) and all(isinstance(k, int) for k in description["keep"])):
            raise ValueError("malformed prune record")

