"""Rebuild a whole pool from an object store alone (`chunkvol restore --from URL --pool PATH`).

1. Find the pool in the store (`chunkvol/UUID/pool.json`; one pool, or the one named). If
   the pool is encrypted (its marker, format/store_marker.py), the key given must be the one
   the marker names, and without one, or with another, the restore refuses (StoreKeyError)
   before anything is created; every object is then read through it (objstore/sealed_store.py).
2. Read every segment's header (a ranged read of 120 bytes each) and check each origin's
   chain before anything is written: a segment that is damaged, swapped, from elsewhere,
   or missing is named, and the restore refuses.
3. Create the pool in PATH.restoring (same pool identity, a node id of its own), then fetch
   the segments in stamp order (one fetched ahead while the previous one is applied) and
   give each to the receiver, exactly as a mirror takes a batch: checked, appended, synced,
   applied. `--until TIME` stops at the last flush point at or before TIME.
4. Close cleanly and rename PATH.restoring to PATH: a restore that fails leaves no pool
   that looks whole.

The restored pool is a writable pool of its own node; every volume, snapshot and flush
point of the log in the store is there, as of the last segment restored.
"""

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from chunkvol.clock import new_node_id
from chunkvol.errors import AlreadyExistsError, CorruptionError, NotFoundError, UsageError
from chunkvol.format import segment, store_pool
from chunkvol.format.record import HEADER_SIZE, RecordType, decode_header
from chunkvol.mirror import receiver
from chunkvol.objstore import open_store
from chunkvol.objstore.sealed_store import open_pool
from chunkvol.pool import Pool


HEADER_READERS = 8


class RestoreReport:
    def __init__(self):
        self.segments = 0
        self.records = 0
        self.bytes = 0
        self.seconds = 0.0
        self.last_stamp = 0
        self.volumes = []
        self.origins = {}


def find_pool(store, pool_uuid=None):
    """The uuid (bytes) of the pool to restore from the store."""
    found = sorted({name.split("/")[1] for name in store.list("chunkvol/")
                    if name.endswith("/pool.json") and name.count("/") == 2})
    if pool_uuid is not None:
        if pool_uuid.lower() not in found:
            raise NotFoundError(f"{store.url} holds no pool {pool_uuid} (it holds: {', '.join(found) or 'none'})")
        return bytes.fromhex(pool_uuid)
    if not found:
        raise NotFoundError(f"{store.url} holds no chunkvol pool")
    if len(found) > 1:
        raise UsageError(f"{store.url} holds {len(found)} pools ({', '.join(found)}): name one with --pool-uuid")
    return bytes.fromhex(found[0])


def read_chains(store, pool_uuid):
    """{origin: [SegmentHeader, ...]} in sequence order, every chain checked whole."""
    prefix = segment.pool_prefix(pool_uuid) + "log/"
    chains = {}
    names = {}
    listed = store.list(prefix)
    for name in listed:
        parsed = segment.parse_name(name)
        if parsed is None or parsed[0] != pool_uuid:
            raise CorruptionError("an object that is not a segment of this pool lies among its segments", name)
    # One small ranged read per segment: in parallel, so a long log costs a few round trips.
    with ThreadPoolExecutor(max_workers=HEADER_READERS) as readers:
        heads = readers.map(lambda name: store.get(name, 0, segment.HEADER_SIZE), listed)
        for name, head in zip(listed, heads):
            header = segment.decode_header(head, name)
            chains.setdefault(header.origin, []).append(header)
            names[id(header)] = name
    for origin, chain in chains.items():
        chain.sort(key=lambda header: header.first_sequence)
        previous_sequence, previous_digest, previous_name = 0, 0, None
        for header in chain:
            name = names[id(header)]
            if header.previous_sequence > previous_sequence:
                where = f"after {previous_name}" if previous_name else "at the start of the chain"
                raise CorruptionError(f"node {origin}'s segments are incomplete: the one holding sequences "
                                      f"{previous_sequence + 1}..{header.previous_sequence} is missing ({where}, "
                                      f"before {name})")
            if header.previous_sequence < previous_sequence or header.first_sequence <= previous_sequence:
                raise CorruptionError(f"node {origin}'s segments overlap: {name} does not follow {previous_name}")
            if header.previous_digest != previous_digest:
                raise CorruptionError(f"{name} does not follow {previous_name or 'the start'}: the chain's digest "
                                      "differs (one of the two was replaced)", name)
            previous_sequence, previous_digest, previous_name = header.last_sequence, header.digest, name
    return chains


def restore(url, path, until=None, pool_uuid=None, progress=None, key=None):
    """Restore the store's pool into `path` (an encrypted one with StoreKey `key`); returns a
    RestoreReport."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, "pool.json")):
        raise AlreadyExistsError(f"a pool already exists at {path}")
    staging = path.rstrip("/") + ".restoring"
    if os.path.exists(staging):
        raise AlreadyExistsError(f"{staging} exists (a restore that failed or is running): remove it first")
    started = time.monotonic()
    report = RestoreReport()
    store = open_store(url)
    try:
        uuid = find_pool(store, pool_uuid)
        store = open_pool(store, uuid, key)
        description_name = store_pool.object_name(uuid)
        description = store_pool.decode(store.get(description_name), uuid, f"{url}/{description_name}")
        chains = read_chains(store, uuid)
        order = sorted((header for chain in chains.values() for header in chain),
                       key=lambda header: (header.last_stamp, header.origin))
        if until is not None:
            order = [header for header in order if header.first_stamp <= until]
        total = sum(header.payload_bytes for header in order)
        node_id = new_node_id(chains)
        if node_id is None:
            raise UsageError(f"the store holds the logs of {len(chains)} nodes: every node index of the pool is "
                             "taken, and a restored pool would write with one of theirs")
        Pool.create(staging, chunk_size=description["chunk_size"], node_id=node_id, pool_uuid=uuid)
        try:
            with Pool.open(staging) as pool:
                _apply_all(store, pool, uuid, order, until, report, progress, total)
                report.volumes = sorted(pool.volumes)
            os.rename(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        store.close()
    report.seconds = time.monotonic() - started
    return report


def _apply_all(store, pool, uuid, order, until, report, progress, total):
    def fetch(header):
        name = segment.name(uuid, header.origin, header.first_sequence, header.last_sequence)
        return name, store.get(name)

    with ThreadPoolExecutor(max_workers=1) as fetcher:
        upcoming = fetcher.submit(fetch, order[0]) if order else None
        for index, expected in enumerate(order):
            name, data = upcoming.result()
            upcoming = fetcher.submit(fetch, order[index + 1]) if index + 1 < len(order) else None
            header = segment.decode_header(data, name)
            if header.digest != expected.digest:
                raise CorruptionError("segment changed in the store while it was being restored", name)
            records = segment.split_records(data, header, name)
            last_stamp = header.last_stamp
            if until is not None and last_stamp > until:
                records, last_stamp = _cut_at(records, until)
                if not records:
                    continue  # this origin has no flush point left before `until`
            receiver.receive(pool, uuid, header.origin, records)
            report.segments += 1
            report.records += len(records)
            report.bytes += header.payload_bytes
            report.origins[header.origin] = header.last_sequence
            report.last_stamp = max(report.last_stamp, last_stamp)
            if progress is not None:
                progress(header.payload_bytes, total)


def _cut_at(records, until):
    """(the records up to the last COMMIT stamped at or before `until`, that stamp)."""
    keep = stamp = 0
    for index, raw in enumerate(records):
        header = decode_header(raw[:HEADER_SIZE])
        if header.record_type == RecordType.COMMIT:
            if header.hlc > until:
                break
            keep, stamp = index + 1, header.hlc
    return records[:keep], stamp
