"""A fault layer for chunkvol's network seam (chunkvol/network.py): connections dropped, cut
mid-frame, reset, delayed, throttled and partitioned, and object-store calls failed, from an
explicit schedule or a seed, acting on the very socket objects the code under test uses.

Faults act below TLS. The connections `FaultyNetwork.connect` makes and its listeners accept
are `FaultySocket`s around the real TCP sockets; TLS over them (`tls_client`, `tls_server`)
runs through ssl.MemoryBIO with the context the code passed, so certificates are checked as
ever and a cut after byte N is a cut of the encrypted stream: a torn TLS record, as a real
link tears it. The other end, faulty or real, sees what a kernel would show it: a FIN, an RST.

A fault's position is a byte count on the wire (encrypted bytes) of one connection in one
direction, so a schedule fires at the same bytes however the threads are timed:

    LinkFault("cut", after_bytes=70_000)            the first connection this network makes
                                                    sends 70 000 bytes, then a FIN mid-record;
                                                    the sender gets BrokenPipeError
    LinkFault("reset", connection=2, after_bytes=5000)
                                                    the second one: an RST (SO_LINGER 0) at
                                                    byte 5000; ConnectionResetError
    LinkFault("drop", side="server", after_bytes=n) the first accepted connection is closed
                                                    (FIN) at the first call that starts at or
                                                    past byte n: a whole TLS record boundary;
                                                    ConnectionAbortedError
    LinkFault("reset", direction="recv", after_bytes=n)
                                                    received bytes past n are never delivered
    LinkFault("delay", seconds=0.05, direction="recv", connection=None)
                                                    every receive call of every connection
                                                    waits first (a round trip's latency)
    LinkFault("throttle", bytes_per_second=1 << 20) sends paced to a rate, 16 KiB at a time

`FaultyNetwork.seeded(seed, ...)` draws one break per connection (kind and byte) from a seed:
the same seed gives the same schedule. `network.fired` lists the faults as they fired, with
the byte they fired at, for a test to compare with the schedule.

`partition(address)` refuses connections to a listening address (ETIMEDOUT at once, where
the kernel would wait) and breaks the live ones, both the connections made to it and those
its listener accepted, until `heal()`: their next call, or the one waiting, fails with
ETIMEDOUT, as TCP_USER_TIMEOUT makes it fail on a real dead link; the other end, if it is
not faulty itself, sees a FIN at once.

`FaultyStore` wraps an object store (chunkvol/objstore): `StoreFault("put", nth=4)` fails the
fourth put with UnreachableError, `stored=True` after the object landed (the reply lost);
`failure_rate` with `seed` fails each call with that probability, in call order.
`FaultyNetwork.open_store` returns one, so an ObjectTarget opened through the network gets it.
"""

import collections
import errno
import random
import socket
import ssl
import struct
import threading
import time

from chunkvol.errors import UnreachableError
from chunkvol.network import Network

BREAKS = ("drop", "cut", "reset")
PACES = ("delay", "throttle")
PACE_BYTES = 16 << 10  # a throttled send goes out this much at a time
TLS_WRITE_BYTES = 16 << 10  # one TLS record's plaintext: a cut can land in any record
# Seam methods the fault layer models, and those it knows to be harmless (local Unix sockets).
MODELLED = {"connect", "listen", "tune", "tls_client", "tls_server", "open_store"}
HARMLESS = {"connect_unix", "listen_unix"}
# What a FaultySocket passes to the real socket untouched: no byte goes through these.
PASSED = {"settimeout", "gettimeout", "setsockopt", "getsockopt", "fileno", "getpeername", "getsockname",
          "family", "type"}

Fired = collections.namedtuple("Fired", "kind side connection byte")


class LinkFault:
    """One fault of a connection: `kind` (BREAKS or PACES), on the `connection`-th one (1-based,
    in the order this network made or accepted them; None: every one) of `side` ("client":
    made by connect, "server": accepted by a listener), at `after_bytes` of `direction`."""

    def __init__(self, kind, after_bytes=0, connection=1, side="client", direction="send", seconds=0.0,
                 bytes_per_second=None):
        assert kind in BREAKS + PACES, kind
        assert side in ("client", "server") and direction in ("send", "recv")
        assert not (direction == "recv" and kind == "cut"), "a cut is the sender's: use drop or reset on recv"
        assert kind != "throttle" or bytes_per_second and direction == "send", "a throttle paces sends"
        self.kind, self.after_bytes, self.connection = kind, after_bytes, connection
        self.side, self.direction = side, direction
        self.seconds, self.bytes_per_second = seconds, bytes_per_second

    def __repr__(self):
        return (f"LinkFault({self.kind!r}, after_bytes={self.after_bytes}, connection={self.connection}, "
                f"side={self.side!r}, direction={self.direction!r})")

    def __eq__(self, other):
        return isinstance(other, LinkFault) and vars(self) == vars(other)


def _error(kind):
    """The error a break leaves on the side it happened to (a new one per call)."""
    return {"cut": lambda: BrokenPipeError(errno.EPIPE, "the link was cut mid-frame (fault layer)"),
            "reset": lambda: ConnectionResetError(errno.ECONNRESET, "the link was reset (fault layer)"),
            "drop": lambda: ConnectionAbortedError(errno.ECONNABORTED, "the link was dropped (fault layer)"),
            "partition": lambda: TimeoutError(errno.ETIMEDOUT, "the link is partitioned (fault layer)")}[kind]()


class FaultySocket:
    """A real connected TCP socket with the faults of one connection. Only the calls node_link
    and the TLS layer make are offered (sendall, send, recv, recv_into, shutdown, close, and
    PASSED): a call the fault model does not know fails instead of bypassing it."""

    def __init__(self, network, real, side, number, endpoint):
        self.network, self.real, self.side, self.number, self.endpoint = network, real, side, number, endpoint
        self.faults = [fault for fault in network.link_faults
                       if fault.side == side and fault.connection in (None, number)]
        self.breaks = {direction: sorted((fault for fault in self.faults
                                          if fault.kind in BREAKS and fault.direction == direction),
                                         key=lambda fault: fault.after_bytes)
                       for direction in ("send", "recv")}
        self.counted = {"send": 0, "recv": 0}
        self.broken = None  # the kind of break that ended this connection

    def __getattr__(self, name):
        if name in PASSED:
            return getattr(self.real, name)
        raise AttributeError(f"FaultySocket does not model {name!r}: add it to tests/support/faulty_network.py")

    # ---- the faults ----------------------------------------------------------------------

    def _check(self):
        if self.broken is None and self.network.partitioned(self.endpoint):
            self.break_link("partition")
        if self.broken is not None:
            raise _error(self.broken)

    def _pace(self, direction, count):
        for fault in self.faults:
            if fault.direction != direction:
                continue
            if fault.kind == "delay":
                time.sleep(fault.seconds)
            elif fault.kind == "throttle" and count:
                time.sleep(count / fault.bytes_per_second)

    def _due(self, direction, length):
        """The first break of `direction` this call reaches, with the bytes of the call that go
        before it; (None, length) when none does."""
        for fault in self.breaks[direction]:
            keep = fault.after_bytes - self.counted[direction]
            if fault.kind == "drop" and keep <= 0:
                return fault, 0  # a drop falls between calls
            if fault.kind != "drop" and keep < length:
                return fault, max(0, keep)
        return None, length

    def _fire(self, fault, direction):
        self.breaks[direction].remove(fault)
        self.network.note(Fired(fault.kind, self.side, self.number, self.counted[direction]))
        self.break_link(fault.kind)
        raise _error(fault.kind)

    def break_link(self, kind):
        """End the real connection as `kind` does: an RST for a reset, a FIN otherwise (which
        also wakes a call waiting in another thread: it then raises the break's error)."""
        self.broken = kind
        try:
            if kind == "reset":
                self.real.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.real.close()
            else:
                self.real.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---- the calls -----------------------------------------------------------------------

    def sendall(self, data):
        view = memoryview(data).cast("B")
        throttled = any(fault.kind == "throttle" for fault in self.faults)
        while True:
            self._check()
            piece = view[:PACE_BYTES] if throttled else view
            fault, keep = self._due("send", len(piece))
            if keep:
                try:
                    self.real.sendall(piece[:keep])
                except OSError:
                    if self.broken is not None:  # broken while this call waited (a partition)
                        raise _error(self.broken) from None
                    raise
                self.counted["send"] += keep
                self._pace("send", keep)
            if fault is not None:
                self._fire(fault, "send")
            view = view[keep:]
            if not view:
                return None

    def send(self, data):
        piece = memoryview(data).cast("B")[:PACE_BYTES]
        self.sendall(piece)
        return len(piece)

    def recv_into(self, buffer, nbytes=0):
        self._check()
        nbytes = nbytes or len(buffer)
        fault, keep = self._due("recv", nbytes)
        if fault is not None and keep == 0:
            self._fire(fault, "recv")
        self._pace("recv", 0)
        try:
            count = self.real.recv_into(buffer, keep)
        except OSError:
            if self.broken is not None:
                raise _error(self.broken) from None
            raise
        if self.broken is not None:  # broken while this call waited (a partition)
            raise _error(self.broken)
        self.counted["recv"] += count
        return count

    def recv(self, bufsize):
        buffer = bytearray(bufsize)
        count = self.recv_into(buffer, bufsize)
        return bytes(buffer[:count])

    def shutdown(self, how):
        self.real.shutdown(how)

    def close(self):
        self.network.forget(self)
        self.real.close()


class FaultyListener:
    """A real listening socket whose accepted connections are FaultySockets (side "server");
    while its address is partitioned, what arrives is reset and never reaches the caller."""

    def __init__(self, network, real):
        self.network, self.real = network, real
        self.address = real.getsockname()[:2]

    def accept(self):
        while True:
            connection, peer = self.real.accept()
            if not self.network.partitioned(self.address):
                return self.network.adopt(connection, "server", self.address), peer
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()

    def getsockname(self):
        return self.real.getsockname()

    def fileno(self):
        return self.real.fileno()

    def close(self):
        self.real.close()


class TlsOverFaults:
    """TLS through ssl.MemoryBIO over a FaultySocket, with the methods of an ssl.SSLSocket that
    chunkvol uses. The handshake runs at once, as context.wrap_socket's does."""

    def __init__(self, context, raw, server_side):
        self.raw = raw
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self._step(self.tls.do_handshake)

    def _flush(self):
        data = self.outgoing.read()
        if data:
            self.raw.sendall(data)

    def _step(self, operation, *arguments):
        """Run a TLS operation, feeding it what arrives until it has enough; what it writes
        goes out, an alert included when it fails."""
        while True:
            try:
                result = operation(*arguments)
            except ssl.SSLWantReadError:
                self._flush()
                data = self.raw.recv(1 << 16)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
                continue
            except ssl.SSLError:
                try:
                    self._flush()
                except OSError:
                    pass
                raise
            self._flush()
            return result

    def settimeout(self, seconds):
        self.raw.settimeout(seconds)

    def gettimeout(self):
        return self.raw.gettimeout()

    def getpeercert(self, binary_form=False):
        return self.tls.getpeercert(binary_form)

    def sendall(self, data):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), TLS_WRITE_BYTES):
            self._step(self.tls.write, view[start:start + TLS_WRITE_BYTES])

    def recv_into(self, buffer, nbytes=0):
        """As an SSLSocket with suppress_ragged_eofs: an end of the stream, torn or not, is 0."""
        try:
            return self._step(self.tls.read, nbytes or len(buffer), buffer)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0

    def recv(self, bufsize):
        buffer = bytearray(bufsize)
        return bytes(buffer[:self.recv_into(buffer, bufsize)])

    def shutdown(self, how):
        self.raw.shutdown(how)

    def close(self):
        self.raw.close()


class FaultyNetwork(Network):
    """The real network with `link_faults` (LinkFault) on its TCP connections, partitions, and
    `store_faults` (StoreFault) / `store_failure_rate` on the object stores it opens."""

    def __init__(self, link_faults=(), store_faults=(), seed=None, store_failure_rate=0.0, store_observer=None):
        self.link_faults = list(link_faults)
        self.store_faults = list(store_faults)
        self.seed = seed
        self.store_failure_rate = store_failure_rate
        self.store_observer = store_observer
        self.lock = threading.Lock()
        self.opened = {"client": 0, "server": 0}
        self.live = set()
        self.partitions = set()
        self.fired = []
        self.stores = []
        self.store_random = random.Random(seed)  # one draw per store call, across every store opened

    @classmethod
    def seeded(cls, seed, connections, first_byte, last_byte, kinds=BREAKS, **keywords):
        """One break on each of the first `connections` client connections, its kind and its
        byte (in [first_byte, last_byte)) drawn from `seed`."""
        rng = random.Random(seed)
        faults = [LinkFault(rng.choice(kinds), after_bytes=rng.randrange(first_byte, last_byte), connection=number)
                  for number in range(1, connections + 1)]
        return cls(faults, seed=seed, **keywords)

    # ---- bookkeeping ---------------------------------------------------------------------

    def adopt(self, real, side, endpoint):
        with self.lock:
            self.opened[side] += 1
            connection = FaultySocket(self, real, side, self.opened[side], tuple(endpoint))
            self.live.add(connection)
        return connection

    def forget(self, connection):
        with self.lock:
            self.live.discard(connection)

    def note(self, fired):
        with self.lock:
            self.fired.append(fired)

    def partitioned(self, address):
        return tuple(address) in self.partitions

    def partition(self, *addresses):
        """Cut the listening `addresses` off: no new connection, and the live ones broken."""
        with self.lock:
            self.partitions.update(tuple(address) for address in addresses)
            cut = [connection for connection in self.live if connection.endpoint in self.partitions]
        for connection in cut:
            if connection.broken is None:
                connection.break_link("partition")

    def heal(self, *addresses):
        """End the partition of `addresses` (of every address when none is given)."""
        with self.lock:
            if addresses:
                self.partitions.difference_update(tuple(address) for address in addresses)
            else:
                self.partitions.clear()

    # ---- the seam ------------------------------------------------------------------------

    def connect(self, address, timeout_seconds):
        if self.partitioned(address):
            raise TimeoutError(errno.ETIMEDOUT, "the link is partitioned (fault layer)")
        return self.adopt(super().connect(address, timeout_seconds), "client", address)

    def listen(self, host, port):
        return FaultyListener(self, super().listen(host, port))

    def tls_client(self, context, raw):
        return TlsOverFaults(context, raw, server_side=False)

    def tls_server(self, context, raw):
        return TlsOverFaults(context, raw, server_side=True)

    def open_store(self, url, retry_seconds=None):
        store = FaultyStore(super().open_store(url, retry_seconds), self.store_faults, rng=self.store_random,
                            failure_rate=self.store_failure_rate, observer=self.store_observer)
        self.stores.append(store)
        return store


# ---- object stores ---------------------------------------------------------------------------

class StoreFault:
    """Fail the `nth` call (1-based) of store operation `op` with UnreachableError, `count`
    calls in a row; `stored`: a put that fails after its object landed (the reply lost)."""

    def __init__(self, op, nth=1, count=1, stored=False):
        assert op in FaultyStore.OPERATIONS
        self.op, self.nth, self.count, self.stored = op, nth, count, stored
        self.seen = self.fired = 0

    def triggers(self):
        self.seen += 1
        if self.seen < self.nth or self.fired >= self.count:
            return False
        self.fired += 1
        return True


class FaultyStore:
    """An object store (chunkvol/objstore's five calls) that fails calls as scheduled or, from
    `seed` (or the random `rng`, shared by the stores of one FaultyNetwork), each with probability
    `failure_rate`. `calls` lists (op, name, failed) of every call, and `failed` (op, name,
    stored) of those that failed; `observer(op, name)` runs before each."""

    OPERATIONS = ("put", "get", "size", "list", "delete")

    def __init__(self, inner, faults=(), seed=None, failure_rate=0.0, observer=None, rng=None):
        self.inner = inner
        self.faults = [StoreFault(fault.op, fault.nth, fault.count, fault.stored) for fault in faults]
        self.random = rng or random.Random(seed)
        self.failure_rate = failure_rate
        self.observer = observer
        self.calls, self.failed = [], []
        self.url = inner.url

    def _call(self, op, name, call):
        if self.observer is not None:
            self.observer(op, name)
        fault = next((fault for fault in self.faults if fault.op == op and fault.triggers()), None)
        failing = fault is not None or (self.failure_rate and self.random.random() < self.failure_rate)
        self.calls.append((op, name, bool(failing)))
        if not failing:
            return call()
        stored = fault is not None and fault.stored
        if stored:
            call()
        self.failed.append((op, name, stored))
        raise UnreachableError(f"{self.url}: {op} {name}: the store went away (fault layer)")

    def put(self, name, data):
        return self._call("put", name, lambda: self.inner.put(name, data))

    def get(self, name, offset=0, length=None):
        return self._call("get", name, lambda: self.inner.get(name, offset, length))

    def size(self, name):
        return self._call("size", name, lambda: self.inner.size(name))

    def list(self, prefix):
        return self._call("list", prefix, lambda: self.inner.list(prefix))

    def delete(self, name):
        return self._call("delete", name, lambda: self.inner.delete(name))

    def close(self):
        self.inner.close()
