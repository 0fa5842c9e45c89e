"""Scanning the whole log for damage (`check`, `scrub`): every record of every chunk, header
and payload checksums, from each chunk's first record to its end. At a bad record it notes the
chunk and offset, resynchronises on the next valid header and goes on: the scan never stops
at the first problem."""

from chunkvol.format.chunk_header import DATA_OFFSET
from chunkvol.log.reader import ChunkScan, find_next_header


def scan_log(chunks, progress=None, tail_may_be_unfinished=False):
    """([(chunk path, offset, message)] for every bad record, records read, bytes read) of the
    chunks of `chunks` (a ChunkTable). `tail_may_be_unfinished`: a writer (a running server)
    may be in the middle of the last chunk's last record, which is then not damage."""
    problems = []
    records = 0
    scanned_bytes = 0
    ids = chunks.ids()
    last = ids[-1] if ids else None
    for chunk_id in ids:
        chunk = chunks.get(chunk_id)
        offset = DATA_OFFSET
        while offset is not None and offset < chunk.size_bytes:
            scan = ChunkScan(chunks, chunk_id, offset)
            for _ in scan:
                records += 1
            if scan.stop_error is None:
                break
            if chunk_id == last and tail_may_be_unfinished and find_next_header(
                    chunks, chunk_id, scan.stop_offset, chunk.size_bytes) is None:
                break  # a running server's unfinished tail, not damage
            problems.append((chunk.path, scan.stop_offset, str(scan.stop_error)))
            offset = find_next_header(chunks, chunk_id, scan.stop_offset, chunk.size_bytes)
        scanned_bytes += chunk.size_bytes
        if progress:
            progress(chunk.size_bytes)
    return problems, records, scanned_bytes
