"""One mirror's shipper: from its durable cursor, read this node's records from the log on
disk up to the horizon (how far the log is durable), send them in batches, and move the
cursor only after the mirror has synced them.

The horizon comes from the server (control operation `log_horizon`, which first makes a
flush point of what was written, so a mirror lags by one poll, not by one client flush)
or, with no server, from the pool opened here. Nothing is shipped that is not durable here:
a record lost to a power cut here can never be on a mirror.

Memory is one batch (MAX_BATCH_BYTES, or one second of bandwidth), two for an object store
(the one being sent and the one read ahead), however far behind the mirror is. A bandwidth
limit is kept on average: after each batch the shipper waits until its bytes fit the rate.
"""

import contextlib
import time

from chunkvol.errors import ChunkvolError, UnreachableError
from chunkvol.mirror import targets
from chunkvol.mirror.config import key_of, learn_peer_node, load_state, save_state
from chunkvol.mirror.read_ahead import ReadAhead
from chunkvol.mirror.source import LogSource, age_seconds
from chunkvol.mirror.target import PipelinedTarget
from chunkvol.storage.files import LocalFiles

MAX_BATCH_BYTES = 8 << 20
MIN_BATCH_BYTES = 64 << 10
RATE_WEIGHT = 0.3  # of the newest batch in the moving average


class Shipper:
    def __init__(self, pool_path, fields, name, definition, files=None, network=None):
        self.pool_path = pool_path
        self.fields = fields
        self.name = name
        self.definition = definition
        self.files = files or LocalFiles()
        self.network = network  # chunkvol/network.py, the real one unless given
        self.node_id = fields["node_id"]
        self.source = LogSource(pool_path, fields, self.files)
        self.state = load_state(pool_path, name, self.source.first_address(), self.files)
        self.target = None
        self.next_send = 0.0

    def close(self):
        if self.target is not None:
            self.target.close()
            self.target = None
        self.source.close()

    def _connect(self):
        if self.target is None:
            try:
                self.target = targets.open_target(self.definition["to"], self.fields, self.pool_path,
                                                   self.network, key_of(self.definition))
            except OSError as error:
                raise UnreachableError(f"mirror {self.name} ({self.definition['to']}): {error}") from None
            if self.definition.get("peer") and self.definition.get("node") is None:
                node = learn_peer_node(self.pool_path, self.name, self.node_id, self.target.peer, self.files)
                self.definition = dict(self.definition, node=node)
        return self.target

    def batch_bytes(self):
        bandwidth = self.definition.get("bandwidth")
        if not bandwidth:
            return MAX_BATCH_BYTES
        return max(MIN_BATCH_BYTES, min(MAX_BATCH_BYTES, bandwidth))

    def ship(self, horizon, progress=None, stop=None):
        """Send everything of this node's up to the last flush point before `horizon`.
        Returns the bytes of records sent. Errors are recorded in the state and raised.

        For a target that asks for it (READ_AHEAD: object stores), the next batch is read
        (and, for a PipelinedTarget, encoded: mirror/target.py) in a read-ahead thread while
        the current one is sent (mirror/read_ahead.py). Either way the cursor moves here,
        only after the target has acknowledged a batch, so an error or a stop discards at
        most the batch read ahead and the next ship reads it again."""
        try:
            target = self._connect()
            held = target.have(self.node_id)
            sent = 0
            state = self.state
            pipelined = isinstance(target, PipelinedTarget)
            encode = target.encode if pipelined else None
            chain = target.tail(self.node_id) if pipelined else None
            read_ahead = target.READ_AHEAD
            batches = self._read(state["cursor"], horizon, held, encode, chain)
            if read_ahead:
                batches = ReadAhead(batches, name=f"chunkvol-read-{self.name}")
            with contextlib.closing(batches):
                for batch, encoded, distance in batches:
                    if stop is not None and stop.is_set():
                        break
                    started = time.monotonic()
                    if batch.records:
                        if not self._throttle(batch.size_bytes, stop):
                            break
                        held = target.put(encoded) if encoded is not None else target.send(self.node_id,
                                                                                            batch.records)
                        elapsed = max(time.monotonic() - started, 1e-6)
                        rate = batch.size_bytes / elapsed
                        state["rate"] = rate if not state["rate"] else (
                            (1 - RATE_WEIGHT) * state["rate"] + RATE_WEIGHT * rate)
                    if progress is not None:
                        progress(distance)
                    state["cursor"] = batch.end
                    state["shipped_sequence"] = max(state["shipped_sequence"], held)
                    state["shipped_records"] += len(batch.records)
                    state["shipped_bytes"] += batch.size_bytes
                    state["state"] = "shipping"
                    state["updated"] = time.time()
                    save_state(self.pool_path, self.name, state, self.files)
                    sent += batch.size_bytes
                    if read_ahead:
                        # Dropped before the next is asked for: two batches at most. Without a
                        # read-ahead it is kept until the next is read, as it always was: dropped
                        # first, glibc gives its pages back and faults them in again every batch.
                        batch = encoded = None
            if state["state"] != "idle" or state.get("last_error"):
                state["state"], state["last_error"], state["last_error_kind"] = "idle", None, None
                state["updated"] = time.time()
                save_state(self.pool_path, self.name, state, self.files)
            return sent
        except ChunkvolError as error:
            self._failed(error)
            raise
        except OSError as error:
            self._failed(error)
            raise UnreachableError(f"mirror {self.name} ({self.definition['to']}): {error}") from None

    def _read(self, cursor, horizon, held, encode, chain):
        """(batch, its segment or None, log bytes it moves the cursor) for every batch from
        `cursor`; with a read-ahead, in its thread, the only one using self.source meanwhile.
        `encode` (an object store's) chains each segment to the one before, from `chain`."""
        for batch in self.source.batches(cursor, horizon, self.batch_bytes(), skip_through=held):
            distance = self.source.distance(cursor, batch.end)
            cursor = batch.end
            encoded = None
            if encode is not None and batch.records:
                encoded = encode(self.node_id, batch.records, chain)
                chain = encoded.after
            yield batch, encoded, distance

    def _failed(self, error):
        if self.target is not None:
            try:
                self.target.close()
            except (ChunkvolError, OSError):
                pass
            self.target = None
        self.state["state"] = "error"
        self.state["last_error"] = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {error}"
        self.state["last_error_kind"] = type(error).__name__ if isinstance(error, ChunkvolError) else "UnreachableError"
        self.state["updated"] = time.time()
        try:
            save_state(self.pool_path, self.name, self.state, self.files)
        except OSError:
            pass

    def _throttle(self, size, stop=None):
        """Wait until `size` more bytes fit the bandwidth limit; False if stopped meanwhile."""
        bandwidth = self.definition.get("bandwidth")
        if not bandwidth:
            return True
        now = time.monotonic()
        if self.next_send > now:
            if stop is not None:
                if stop.wait(self.next_send - now):
                    return False
            else:
                time.sleep(self.next_send - now)
        self.next_send = max(now, self.next_send) + size / bandwidth
        return True

    def status(self, horizon, next_sequence):
        """What `mirror status` shows for this mirror."""
        state = self.state
        behind_bytes = self.source.distance(state["cursor"], horizon)
        if behind_bytes and next_sequence - 1 <= state["shipped_sequence"]:
            # Every record of ours is there: what lies past the cursor is a peer's records
            # (never shipped back) or local ones (SEAL); the cursor moves at our next flush point.
            behind_bytes = 0
        oldest = self.source.first_own_stamp(state["cursor"], horizon) if behind_bytes else 0
        rate = state["rate"] or 0.0
        return {
            "name": self.name, "to": self.definition["to"], "bandwidth": self.definition.get("bandwidth"),
            "state": state["state"], "cursor": state["cursor"],
            "records_behind": max(0, next_sequence - 1 - state["shipped_sequence"]) if behind_bytes else 0,
            "bytes_behind": behind_bytes,
            "seconds_behind": round(age_seconds(oldest), 3) if oldest else 0.0,
            "shipped_records": state["shipped_records"], "shipped_bytes": state["shipped_bytes"],
            "throughput_bytes_per_second": round(rate, 1),
            "eta_seconds": round(behind_bytes / rate, 1) if rate and behind_bytes else (0.0 if not behind_bytes else None),
            "last_error": state.get("last_error"), "updated": state["updated"],
        }

