"""The seam for all network I/O, so that tests can put a faulty layer in its place (as
storage/files.py is for files).

Every socket chunkvol opens is opened by a `Network`: the TCP connections and listeners of
replication between nodes (mirror/node_link.py) and of `serve --port` (forwarder.py), the
Unix sockets of the control channel (control.py), of nbdkit behind the forwarder and of the
stale-socket probe of `serve` (cli/serve_command.py), and the object stores a mirror ships to
(chunkvol/objstore, which reach their machines through their own client libraries; restore,
tiering and the read of evicted chunks still call objstore.open_store directly). Whatever
reaches another machine takes a `network=` parameter defaulting to the real one, as pools take
`files=`; tests pass a subclass that drops, delays, cuts, resets and partitions connections
and fails object-store calls, all from a seed (tests/support/faulty_network.py).

The real layer returns plain `socket.socket` and `ssl.SSLSocket` objects, so nothing stands
between a byte and the kernel. A fault layer returns objects with the methods the callers
use: settimeout, sendall, recv, recv_into, shutdown, close and setsockopt on connections,
accept, getsockname and close on listeners, getpeercert on TLS connections.

Replication sockets (`tune`) send every frame at once (TCP_NODELAY: an ACK is small and
awaited) and report a dead link within LINK_DEAD_SECONDS on both sides, whether this side is
sending (unacknowledged bytes: TCP_USER_TIMEOUT) or waiting (keepalive probes, also bounded
by the user timeout).
"""

import socket

from chunkvol import objstore

# A link that stops carrying bytes (a partition, a peer's power cut) is given up after this
# long, on both sides, so a shipper reconnects soon after the link comes back instead of
# waiting out the kernel's ever longer retransmission timeouts (about 0.8 x the partition).
LINK_DEAD_SECONDS = 15
KEEPALIVE_IDLE_SECONDS = 5
KEEPALIVE_INTERVAL_SECONDS = 2


class Network:
    """The system's sockets. Methods are thin so that fault layers override exactly one step."""

    def connect(self, address, timeout_seconds):
        """A TCP connection to (host, port); OSError when it cannot be made in time."""
        return socket.create_connection(address, timeout=timeout_seconds)

    def listen(self, host, port):
        """A listening TCP socket (port 0: any free one, see getsockname)."""
        return socket.create_server((host, port), reuse_port=False)

    def tune(self, raw):
        """Replication's socket options on a connected TCP socket (the module docstring)."""
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_SECONDS)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_SECONDS)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT,
                       max(1, (LINK_DEAD_SECONDS - KEEPALIVE_IDLE_SECONDS) // KEEPALIVE_INTERVAL_SECONDS))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, LINK_DEAD_SECONDS * 1000)

    def tls_client(self, context, raw):
        """TLS over the connection `raw` (the handshake runs now, within raw's timeout)."""
        return context.wrap_socket(raw)

    def tls_server(self, context, raw):
        """TLS over an accepted connection `raw`, as the server."""
        return context.wrap_socket(raw, server_side=True)

    def connect_unix(self, path, timeout_seconds=None):
        """A connection to the Unix socket `path`; OSError (FileNotFoundError,
        ConnectionRefusedError: nobody listens) when there is none."""
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            connection.settimeout(timeout_seconds)
            connection.connect(path)
        except BaseException:
            connection.close()
            raise
        return connection

    def listen_unix(self, path, backlog):
        """A Unix socket listening at `path` (made with the process's umask)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(path)
            listener.listen(backlog)
        except BaseException:
            listener.close()
            raise
        return listener

    def open_store(self, url, retry_seconds=None):
        """The object store named by `url` (chunkvol/objstore's open_store)."""
        return objstore.open_store(url, retry_seconds)
