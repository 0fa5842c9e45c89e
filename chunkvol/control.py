"""Control socket: how `chunkvol` changes a pool while a server holds it open.

The process that has the pool open for writing (the nbdkit plugin `serve` starts) listens on
a Unix socket named after the pool's absolute path in /run/chunkvol (or /tmp/chunkvol-UID when
/run is not writable), in a directory of mode 0700: only the owner may connect. It is kept out
of the pool directory so that copying a pool never meets a socket, and a path of any length works. A client sends one request
line and reads one reply line, both UTF-8 JSON of at most MAX_LINE bytes:

    {"op": "snapshot_create", "args": {"points": ["disk0@before-upgrade"]}}
    {"ok": true, "result": ...}    or    {"ok": false, "error": "NotFoundError", "message": "..."}

The operations are chunkvol.operations; each runs under the pool's lock, between requests.
"""

import hashlib
import json
import os
import socket
import threading

from chunkvol import errors
from chunkvol.network import Network
from chunkvol.operations import OPERATIONS

RUNTIME_DIRECTORIES = ("/run/chunkvol", f"/tmp/chunkvol-{os.getuid()}")
MAX_LINE = 1 << 20
CLIENT_TIMEOUT = 3600.0  # a compaction may take long; a dead server still fails at connect


def socket_path(pool_path):
    name = hashlib.sha256(os.path.realpath(pool_path).encode()).hexdigest()[:24]
    for directory in RUNTIME_DIRECTORIES:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return os.path.join(directory, f"pool-{name}.sock")
    raise errors.ChunkvolError(f"no runtime directory for control sockets ({', '.join(RUNTIME_DIRECTORIES)})")


class ControlServer:
    def __init__(self, pool):
        self.pool = pool
        self.path = socket_path(pool.path)
        self.listener = None
        self.thread = None
        self.stopping = False

    def start(self):
        """Listen (replacing a stale socket: we hold the pool lock, so no one else does)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old_mask = os.umask(0o177)
        try:
            self.listener = Network().listen_unix(self.path, backlog=8)
        finally:
            os.umask(old_mask)
        self.thread = threading.Thread(target=self._serve, name="chunkvol-control", daemon=True)
        self.thread.start()
        return self

    def _serve(self):
        while not self.stopping:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed by stop()
            with connection:
                try:
                    connection.settimeout(30)
                    reply = self._handle(_read_line(connection))
                except (OSError, ValueError) as error:
                    reply = {"ok": False, "error": "UsageError", "message": f"bad control request: {error}"}
                try:
                    connection.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass  # the client went away; the operation itself is done

    def _handle(self, line):
        request = json.loads(line)
        if not isinstance(request, dict) or request.get("op") not in OPERATIONS \
                or not isinstance(request.get("args", {}), dict):
            return {"ok": False, "error": "UsageError", "message": f"unknown control request {str(request)[:200]!r}"}
        try:
            result = OPERATIONS[request["op"]](self.pool, **request.get("args", {}))
        except errors.ChunkvolError as error:
            return {"ok": False, "error": type(error).__name__, "message": str(error)}
        except TypeError as error:
            return {"ok": False, "error": "UsageError", "message": f"bad arguments for {request['op']}: {error}"}
        return {"ok": True, "result": result}

    def stop(self):
        self.stopping = True
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
        if self.thread is not None:
            self.thread.join(timeout=CLIENT_TIMEOUT)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _read_line(connection):
    data = bytearray()
    while not data.endswith(b"\n"):
        piece = connection.recv(65536)
        if not piece:
            break
        data += piece
        if len(data) > MAX_LINE:
            raise ValueError("request longer than 1 MiB")
    return data.decode()


def call(pool_path, op, **args):
    """Run an operation in the server that holds the pool; its errors are raised here."""
    path = socket_path(pool_path)
    try:
        client = Network().connect_unix(path, CLIENT_TIMEOUT)
    except (FileNotFoundError, ConnectionRefusedError):
        raise errors.PoolBusyError(f"pool {os.path.abspath(pool_path)} is held by a process without a "
                                   "control socket (another command); try again when it ends") from None
    try:
        client.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        line = _read_line(client)
    finally:
        client.close()
    if not line:
        raise errors.ChunkvolError("the server closed the control connection without a reply")
    reply = json.loads(line)
    if reply.get("ok"):
        return reply.get("result")
    kind = getattr(errors, str(reply.get("error")), errors.ChunkvolError)
    if not (isinstance(kind, type) and issubclass(kind, errors.ChunkvolError)):
        kind = errors.ChunkvolError
    raise kind(reply.get("message", "the server refused the request"))

