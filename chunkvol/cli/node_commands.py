"""`chunkvol join-file OUT` and `chunkvol receive --listen HOST:PORT`: other nodes of a pool."""

import os
import signal
import sys
import threading

from chunkvol.clock import new_node_id
from chunkvol.errors import UsageError
from chunkvol.mirror import identity
from chunkvol.mirror.node_link import ReceiverServer
from chunkvol.pool import Pool


def register(commands):
    join = commands.add_parser("join-file", help="write a file that lets another machine join this pool as a node")
    join.add_argument("output", metavar="OUT")
    join.set_defaults(run=join_file)
    receive = commands.add_parser("receive", help="accept records from this pool's other nodes (foreground)")
    receive.add_argument("--listen", required=True, metavar="HOST:PORT")
    receive.set_defaults(run=receive_command)


def parse_listen(text):
    host, _, port = (text or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {text!r}: use HOST:PORT (e.g. 127.0.0.1:10900)")
    return host.strip("[]"), int(port)


def join_file(arguments):
    path = os.path.abspath(arguments.pool)
    fields = Pool.read_metadata(path)
    if fields.get("role") == "mirror":
        raise UsageError("issue join files on the pool's founding node, not on a mirror")
    identity.check_writable_file(arguments.output)
    issued = identity.issued_nodes(path)
    node_id = new_node_id([fields["node_id"], *issued])
    if node_id is None:
        raise UsageError(f"this pool has {len(issued) + 1} nodes already, the most it can have")
    data = identity.issue_join(path, fields, node_id)
    fd = os.open(arguments.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"wrote {arguments.output} (node {node_id} of pool {fields['pool_uuid']}; keep it secret: it holds "
          f"that node's key). On the other machine: chunkvol --pool PATH init --join {os.path.basename(arguments.output)}")


def receive_command(arguments):
    host, port = parse_listen(arguments.listen)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with Pool.open(arguments.pool) as pool:
        server = ReceiverServer(pool, host, port, log=lambda line: print(f"chunkvol: {line}", file=sys.stderr,
                                                                         flush=True)).start()
        print(f"receiving for node {pool.node_id} of pool {pool.pool_uuid.hex()} on {host}:{server.port}",
              flush=True)
        try:
            stop.wait()
        finally:
            server.stop()
