"""What a mirror target is: the one interface the shipper and self-healing use, whatever holds
the copy (`dir:` a pool on another disk, `node:` another node over TLS, `rados:`/`s3:` an
object store, or records kept in memory for tests). tests/mirror/test_target_conformance.py holds
every target to it.

A target MUST:

1. `have(origin)`: answer the greatest sequence of `origin`'s records it holds (0: none);
   the shipper resumes after it.
2. `send(origin, records)`: take one batch (each item the bytes of one whole record) whole
   or not at all, and answer `have(origin)` after it. A batch that does not end at a COMMIT,
   or holds anything a node of the pool never sends (a broken checksum, another origin's
   record), is refused with PeerError and changes nothing. Records it holds already (a batch
   sent again after a lost acknowledgement) are not taken twice.
3. `fetch(volume_ids, group, ref, record_offset)`: answer the bytes (header and payload) of
   its copy of the EXTENT record that block-map ref `ref` (address, stored length, stamp,
   flags) names at volume offset `record_offset` (in map group `group`, in one of
   `volume_ids`), or None when it has none. Self-healing checks what comes back again: a
   target may be wrong, never trusted.
4. `describe()`: a JSON-able dict saying where it is, for status and logs.
5. `close()`: let go of what it holds open; a second close does nothing.
6. `READ_AHEAD`: whether the shipper reads (and encodes) the next batch while this one is
   sent. True only where the sending, not the reading, is the limit (docs/BENCH.md).

A `PipelinedTarget` (an object store) also splits `send` in two, so that the shipper encodes
the next batch in its read-ahead thread while the current one is put: `tail(origin)` is
where the origin's chain ends, `encode(origin, records, previous)` makes a batch's object
chained to `previous` without touching the target, `put(encoded)` stores it and answers as
`send` does.
"""

from typing import ClassVar, Optional, Protocol, runtime_checkable


@runtime_checkable
class Target(Protocol):
    READ_AHEAD: ClassVar[bool]

    def have(self, origin: int) -> int: ...

    def send(self, origin: int, records: list) -> int: ...

    def fetch(self, volume_ids, group: int, ref: tuple, record_offset: int) -> Optional[bytes]: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


@runtime_checkable
class PipelinedTarget(Target, Protocol):
    def tail(self, origin: int) -> tuple: ...

    def encode(self, origin: int, records: list, previous: tuple): ...

    def put(self, encoded) -> int: ...
