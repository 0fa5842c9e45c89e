"""Replication between nodes over TCP and mutual TLS (format/wire.py, mirror/identity.py).

`NodeTarget` is a shipper's side (`mirror add NAME --to node:HOST:PORT`); `ReceiverServer`
accepts other nodes' batches into a pool (`chunkvol receive --listen`, or `serve --listen`,
where it runs in the server beside the NBD exports). A peer is refused, with the reason in
the log and nothing applied, when: its certificate is not signed by this pool's authority
(another pool, or not a node: the handshake fails), it names another pool or another node
than its certificate, it sends anything but well-formed frames (bad magic, a length over the
limit, a checksum mismatch), it sends records that are not its own or that fail
mirror/receiver.py's checks, or it drips a frame slower than MIN_BYTES_PER_SECOND.
"""

import socket
import ssl
import threading
import time

from chunkvol import copies
from chunkvol.errors import ChunkvolError, PeerError, UnreachableError
from chunkvol.format import group_map, wire
from chunkvol.mirror import config as mirror_config
from chunkvol.mirror import identity, receiver
from chunkvol.mirror.source import log_distance
from chunkvol.network import Network

CONNECT_SECONDS = 5.0  # SYNs at 0, 1 and 3 s: a link that comes back is found within seconds
HANDSHAKE_SECONDS = 10.0
FRAME_GRACE_SECONDS = 30.0
MIN_BYTES_PER_SECOND = 4096
MAX_CONNECTIONS = 16


def _read_exactly(connection, length, deadline):
    buffer = bytearray(length)
    view = memoryview(buffer)
    received = 0
    while received < length:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerError("the peer is too slow: a frame did not arrive in time")
        connection.settimeout(remaining)
        try:
            count = connection.recv_into(view[received:], min(length - received, 1 << 20))
        except socket.timeout:
            raise PeerError("the peer is too slow: a frame did not arrive in time") from None
        if count == 0:
            raise PeerError("the peer closed the connection in the middle of a frame" if received
                            else "the peer closed the connection")
        received += count
    return buffer


def read_frame(connection):
    """(kind, payload) of the next frame, checked; PeerError for anything else."""
    deadline = time.monotonic() + FRAME_GRACE_SECONDS
    head = _read_exactly(connection, wire.HEAD.size, deadline)
    kind, length, checksum = wire.decode_head(bytes(head))
    payload = _read_exactly(connection, length, deadline + length / MIN_BYTES_PER_SECOND)
    wire.check_payload(payload, checksum)
    return kind, payload


class NodeTarget:
    """The shipper's connection to another node of the pool (a Target, mirror/target.py)."""

    READ_AHEAD = False  # the receiver's sync, not the reading here, is the limit

    def __init__(self, host, port, source_fields, pool_path, network=None):
        self.address = (host, port)
        self.pool_uuid = source_fields["pool_uuid"]
        self.node_id = source_fields["node_id"]
        context = identity.client_context(pool_path)
        network = network or Network()
        try:
            raw = network.connect(self.address, CONNECT_SECONDS)
        except OSError as error:
            raise UnreachableError(f"node {host}:{port}: {error.strerror or error}") from None
        try:
            network.tune(raw)
            raw.settimeout(HANDSHAKE_SECONDS)
            self.connection = network.tls_client(context, raw)
        except ssl.SSLError as error:
            raw.close()
            raise PeerError(f"node {host}:{port} refused, or is not a node of this pool: TLS: {error.reason}") from None
        except OSError as error:
            raw.close()
            raise UnreachableError(f"node {host}:{port}: {error}") from None
        try:
            self.peer = identity.peer_node(self.connection, self.pool_uuid)
            self._send(wire.encode_json(wire.HELLO, {"pool_uuid": self.pool_uuid, "node_id": self.node_id,
                                                     "version": wire.VERSION}))
            welcome = self._reply(wire.WELCOME)
            if welcome.get("pool_uuid") != self.pool_uuid or not isinstance(welcome.get("have"), int):
                raise PeerError(f"node {host}:{port} answered for another pool")
            self.held = welcome["have"]
            self.status = welcome.get("status") if isinstance(welcome.get("status"), dict) else {}
        except BaseException:
            self.close()
            raise

    def _send(self, frame):
        self.connection.settimeout(FRAME_GRACE_SECONDS + len(frame) / MIN_BYTES_PER_SECOND)
        try:
            self.connection.sendall(frame)
        except OSError as error:
            raise UnreachableError(f"node {self.address[0]}:{self.address[1]}: {error}") from None

    def _reply(self, expected):
        where = f"node {self.address[0]}:{self.address[1]}"
        try:
            kind, payload = read_frame(self.connection)
        except OSError as error:
            raise UnreachableError(f"{where}: {error}") from None
        except PeerError as error:
            if "closed the connection" in str(error) or "too slow" in str(error):
                raise UnreachableError(f"{where}: {error}") from None
            raise PeerError(f"{where}: {error}") from None
        document = wire.decode_json(payload)
        if kind == wire.ERROR:
            raise PeerError(f"node {self.address[0]}:{self.address[1]} refused: {document.get('message')}")
        if kind != expected:
            raise PeerError(f"node {self.address[0]}:{self.address[1]} sent frame kind {kind}, not {expected}")
        return document

    def have(self, origin):
        return self.held

    def send(self, origin, records):
        frame = wire.encode_batch(origin, records)
        if len(frame) - wire.HEAD.size > wire.MAX_PAYLOAD:
            raise ChunkvolError(f"a flush interval of {len(frame)} bytes is more than one frame carries "
                                f"({wire.MAX_PAYLOAD}); it cannot be shipped to a node")
        self._send(frame)
        answer = self._reply(wire.ACK)
        if not isinstance(answer.get("have"), int):
            raise PeerError("a malformed acknowledgement")
        self.held = answer["have"]
        return self.held

    def fetch(self, volume_ids, group, ref, record_offset):
        """The peer's copy of a record (bytes; None when it has none), for self-healing."""
        self._send(wire.encode_json(wire.FETCH, {"volumes": list(volume_ids), "group": group, "ref": list(ref),
                                                 "offset": record_offset}))
        where = f"node {self.address[0]}:{self.address[1]}"
        try:
            kind, payload = read_frame(self.connection)
        except OSError as error:
            raise UnreachableError(f"{where}: {error}") from None
        if kind == wire.ERROR:
            raise PeerError(f"{where} refused: {wire.decode_json(payload).get('message')}")
        if kind != wire.RECORD:
            raise PeerError(f"{where} sent frame kind {kind}, not a record")
        return bytes(payload) or None  # an empty RECORD frame: the peer has no copy

    def describe(self):
        return {"node": self.peer, "address": f"{self.address[0]}:{self.address[1]}"}

    def close(self):
        try:
            self.connection.close()
        except (OSError, AttributeError):
            pass


def peer_status_for(pool, node):
    """What a node tells a peer that connects (`peer status` there): how far its own log goes,
    and how far behind its shipper to that peer is."""
    with pool.lock:
        status = {"next_sequence": pool.next_sequence, "committed_stamp": pool.committed_stamp,
                  "durable": pool.writer.durable_address if pool.writer else 0}
    for name, definition in mirror_config.load_mirrors(pool.path, pool.files).items():
        if definition.get("peer") and definition.get("node") == node:
            state = mirror_config.load_state(pool.path, name, 0, pool.files)
            with pool.lock:
                status["bytes_behind"] = log_distance(pool.chunks, state["cursor"], status["durable"])
            status["shipper_state"] = state["state"]
    return status


class ReceiverServer:
    """Accept batches from the pool's other nodes into `pool` (held open by the caller)."""

    def __init__(self, pool, host, port, log=print, network=None):
        self.pool = pool
        self.pool_uuid_hex = pool.pool_uuid.hex()
        self.context = identity.server_context(pool.path)
        self.log = log
        self.network = network or Network()
        self.listener = self.network.listen(host, port)
        self.port = self.listener.getsockname()[1]
        self.stopping = False
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0
        self.batches = 0

    def start(self):
        threading.Thread(target=self._accept, name="chunkvol-receive", daemon=True).start()
        return self

    def _accept(self):
        while not self.stopping:
            try:
                connection, peer = self.listener.accept()
            except OSError:
                if self.stopping:
                    return
                continue
            if not self.slots.acquire(blocking=False):
                connection.close()
                self.log(f"refused {peer[0]}:{peer[1]}: {MAX_CONNECTIONS} connections already")
                continue
            threading.Thread(target=self._serve, args=(connection, peer), daemon=True).start()

    def _serve(self, raw, peer):
        where = f"{peer[0]}:{peer[1]}"
        connection = None
        try:
            self.network.tune(raw)
            raw.settimeout(HANDSHAKE_SECONDS)
            try:
                connection = self.network.tls_server(self.context, raw)
            except (ssl.SSLError, OSError) as error:
                raise PeerError(f"TLS handshake failed (not a node of this pool?): {error}") from None
            node = identity.peer_node(connection, self.pool_uuid_hex)
            kind, payload = read_frame(connection)
            hello = wire.decode_json(payload)
            if kind != wire.HELLO or hello.get("pool_uuid") != self.pool_uuid_hex or hello.get("node_id") != node:
                raise PeerError(f"a hello that does not match the certificate (node {node})")
            if node == self.pool.node_id:
                raise PeerError(f"the peer claims this node's own id {node}")
            connection.sendall(wire.encode_json(wire.WELCOME, {"pool_uuid": self.pool_uuid_hex,
                                                               "node_id": self.pool.node_id,
                                                               "have": receiver.have(self.pool, node),
                                                               "status": peer_status_for(self.pool, node)}))
            while not self.stopping:
                try:
                    kind, payload = read_frame(connection)
                except PeerError as error:
                    if "closed the connection" in str(error) and "middle" not in str(error):
                        return  # a clean end
                    raise
                if kind == wire.FETCH:
                    connection.sendall(wire.encode(wire.RECORD, self._fetch(wire.decode_json(payload))))
                    continue
                if kind != wire.BATCH:
                    raise PeerError(f"frame kind {kind} where a batch was expected")
                origin, records = wire.decode_batch(payload)
                if origin != node:
                    raise PeerError(f"node {node} sent records of node {origin}")
                have = receiver.receive(self.pool, self.pool.pool_uuid, origin, records)
                self.batches += 1
                connection.sendall(wire.encode_json(wire.ACK, {"have": have}))
        except ChunkvolError as error:
            self.refused += 1
            self.log(f"replication from {where} refused: {error}")
            if connection is not None:
                try:
                    connection.settimeout(5)
                    connection.sendall(wire.encode_json(wire.ERROR, {"error": type(error).__name__,
                                                                     "message": str(error)}))
                except OSError:
                    pass
        except OSError as error:
            self.log(f"replication from {where} ended: {error}")
        finally:
            (connection or raw).close()
            self.slots.release()

    def _fetch(self, request):
        volumes, group, ref, offset = (request.get("volumes"), request.get("group"), request.get("ref"),
                                       request.get("offset"))
        if (not isinstance(volumes, list) or not all(isinstance(v, int) for v in volumes) or len(volumes) > 64
                or not isinstance(group, int) or not isinstance(offset, int) or not isinstance(ref, list)
                or len(ref) != 4 or not all(isinstance(field, int) for field in ref)):
            raise PeerError("a malformed fetch request")
        return copies.live_copy(self.pool, volumes, group, group_map.BlockRef(ref), offset) or b""

    def stop(self):
        self.stopping = True
        try:
            self.listener.close()
        except OSError:
            pass
