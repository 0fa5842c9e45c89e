"""Batches of a source pool's records as a shipper cuts them, and records altered as a hostile
peer would (checksums made right again, so only the rules can refuse them)."""

from chunkvol.format import record
from chunkvol.format.record import FLAG_ZSTD, GROUP_SIZE, HEADER_SIZE, RecordType
from chunkvol.mirror.source import LogSource
from chunkvol.pool import Pool
from chunkvol.storage.files import LocalFiles

HEADER_FIELDS = ("record_type", "flags", "volume_id", "stored_length", "origin_node", "origin_sequence", "hlc",
                 "offset_bytes", "length_bytes")


def header_of(raw):
    return record.decode_header(memoryview(raw)[:HEADER_SIZE])


def batches_of(source, max_bytes=1 << 40):
    """(pool fields, [records of each batch]) of everything durable in `source`, cut as the
    shipper cuts them (each batch ends at one of the source's COMMITs)."""
    fields = Pool.read_metadata(source)
    reader = LogSource(source, fields, LocalFiles())
    try:
        with Pool.open(source, readonly=True) as pool:
            horizon = pool.writer.position
        return fields, [batch.records for batch in reader.batches(reader.first_address(), horizon, max_bytes)
                        if batch.records]
    finally:
        reader.close()


def forged(raw, **changes):
    """The record with header fields changed (HEADER_FIELDS) and both checksums made right."""
    header = list(header_of(raw))
    for name, value in changes.items():
        header[HEADER_FIELDS.index(name)] = value
    payload = bytes(raw[HEADER_SIZE:])
    out = bytearray(HEADER_SIZE + len(payload))
    table = None
    if header[0] == RecordType.EXTENT and not header[1] & FLAG_ZSTD:
        table = payload[:header[8] // 4096 * record.CHECKSUM_BYTES]  # the header's checksum covers it apart
    data = payload if table is None else payload[len(table):]
    record.encode_header_into(out, 0, header[0], header[1], header[2], data, header[4], header[5], header[6],
                              header[7], header[8], table=table)
    out[HEADER_SIZE:] = payload
    return bytes(out)


def flipped(raw, offset_from_end=1):
    """The record with one bit of its payload flipped (its checksums then wrong)."""
    out = bytearray(raw)
    out[-offset_from_end] ^= 0x40
    return bytes(out)


def fetch_key(raw):
    """(volume ids, group, ref, record offset): how self-healing asks a target for the EXTENT
    `raw` (heal.py), with the ref's address left 0: a copy is matched by stamp, not address."""
    header = header_of(raw)
    return [header[2]], header[7] // GROUP_SIZE, (0, header[3], header[6], header[1] & FLAG_ZSTD), header[7]
