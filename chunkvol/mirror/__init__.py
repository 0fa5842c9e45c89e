"""Asynchronous mirrors: each node ships its own records, read from its log on disk, to the
other nodes of its pool, which append them to their own logs and apply them as replay does.

- `receiver.py`: a pool takes a batch of another node's records (checked, whole or not at all).
- `source.py`: this node's own records, read from the chunk files from a cursor.
- `shipper.py`: one mirror's loop: horizon, batches, bandwidth, durable cursor, status.
- `target.py`: what every target is (a Protocol; a PipelinedTarget for object stores).
- `targets.py`: where a batch goes (`dir:PATH`, a pool on another disk; `node:HOST:PORT`).
- `memory_target.py`: records kept in memory, for tests and as the reference target.
- `object_heal.py`: a good copy of a damaged record from an object store's segments (heal.py).
"""
