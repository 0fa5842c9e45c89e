"""A TCP listener that forwards each connection to nbdkit's Unix socket.

nbdkit listens on one kind of socket per process (-U or -p, not both), and a pool is served by
one process; so `chunkvol serve --socket S --port N` runs nbdkit on S and forwards TCP
connections to it. Each connection gets two threads that copy bytes until either side closes.
"""

import socket
import threading

from chunkvol.network import Network

BUFFER_BYTES = 1 << 20


def _pump(source, target):
    buffer = bytearray(BUFFER_BYTES)
    view = memoryview(buffer)
    try:
        while True:
            count = source.recv_into(buffer)
            if not count:
                break
            target.sendall(view[:count])
    except OSError:
        pass
    finally:
        for side in (source, target):
            try:
                side.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class TcpForwarder:
    def __init__(self, address, port, unix_path, network=None):
        self.unix_path = unix_path
        self.network = network or Network()
        self.listener = self.network.listen(address, port)
        self.thread = threading.Thread(target=self._serve, daemon=True, name="tcp-forwarder")

    def start(self):
        self.thread.start()
        return self

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                server = self.network.connect_unix(self.unix_path)
            except OSError:
                client.close()
                continue
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, target), daemon=True).start()

    def close(self):
        self.listener.close()
