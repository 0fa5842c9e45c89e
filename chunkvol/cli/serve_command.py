"""`chunkvol serve`: nbdkit with chunkvol's plugin in the foreground, every volume an export."""

import os
import signal
import stat
import subprocess
import sys
import threading

from chunkvol.cli.node_commands import parse_listen
from chunkvol.errors import UsageError
from chunkvol.forwarder import TcpForwarder
from chunkvol.monitor.log import FORMATS, EventLog
from chunkvol.network import Network
from chunkvol.pool import Pool

SUPERVISE_SECONDS = 2.0
PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "nbdkit_plugin", "chunkvol_plugin.py")


def register(commands):
    serve = commands.add_parser("serve", help="serve every volume over NBD (foreground)")
    serve.add_argument("--socket", help="Unix socket path")
    serve.add_argument("--port", type=int, help="TCP port (on --address)")
    serve.add_argument("--address", default="127.0.0.1", help="TCP address (default 127.0.0.1)")
    serve.add_argument("--readonly", action="store_true")
    serve.add_argument("--volume", help="the export a client gets when it names none")
    serve.add_argument("--thread-model", choices=("serialize", "parallel"), default="serialize",
                       help="nbdkit thread model (default serialize: each connection's requests in turn, "
                            "connections side by side; measured 2-3x faster for small I/O)")
    serve.add_argument("--cache", choices=("writeback", "none"),
                       help="override the pool's cache mode for this run (see `init --cache`)")
    serve.add_argument("--listen", metavar="HOST:PORT",
                       help="also accept records from this pool's other nodes (mutual TLS)")
    serve.add_argument("--tls-certificates", metavar="DIR", help="serve with --tls=require and these certificates")
    serve.add_argument("--http", metavar="HOST:PORT",
                       help="also serve Prometheus metrics (/metrics) and a status page (/) over HTTP, read-only; "
                            "off unless asked for (e.g. 127.0.0.1:9580)")
    serve.add_argument("--log-format", choices=FORMATS, default="text",
                       help="text (default) or json: one JSON object per line (time, level, event, fields)")
    serve.add_argument("--print-attach", action="store_true", help="print how to attach clients")
    serve.set_defaults(run=run_serve)


def nbdkit_command(arguments):
    pool = os.path.abspath(arguments.pool)
    Pool.read_metadata(pool)
    if not arguments.socket and not arguments.port:
        raise UsageError("serve needs --socket PATH and/or --port N")
    command = ["/usr/bin/nbdkit", "-f", "--exit-with-parent"]
    if arguments.socket:
        command += ["-U", os.path.abspath(arguments.socket)]  # TCP, if asked too, is forwarded
    elif arguments.port:
        command += ["-i", arguments.address, "-p", str(arguments.port)]
    if arguments.tls_certificates:
        command += ["--tls=require", f"--tls-certificates={os.path.abspath(arguments.tls_certificates)}"]
    command += ["python", PLUGIN, f"pool={pool}", f"thread_model={arguments.thread_model}"]
    if arguments.readonly:
        command.append("readonly=true")
    if arguments.volume:
        command.append(f"volume={arguments.volume}")
    if arguments.cache:
        command.append(f"cache={arguments.cache}")
    if arguments.listen:
        host, port = parse_listen(arguments.listen)
        if arguments.readonly:
            raise UsageError("--listen takes records into the pool: it cannot go with --readonly")
        command.append(f"listen={host}:{port}")
    if arguments.http:
        host, port = parse_listen(arguments.http)
        command.append(f"http={host}:{port}")
    if arguments.log_format != "text":
        command.append(f"log_format={arguments.log_format}")
    return command


def _clear_stale_socket(path):
    """A server killed with -9 leaves its socket file; nobody answers on it, so it goes. A
    socket somebody answers on is another server: that is an error, not ours to remove."""
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise UsageError(f"{path} exists and is not a socket")
    try:
        Network().connect_unix(path).close()
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    raise UsageError(f"a server is already listening on {path}")


def run_serve(arguments):
    command = nbdkit_command(arguments)
    if arguments.socket:
        _clear_stale_socket(os.path.abspath(arguments.socket))
    log = EventLog(arguments.log_format, stamped=False)
    if arguments.print_attach:
        _print_attach(arguments, log)
    environment = dict(os.environ, PATH="/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
    forwarder = None
    relays = []  # threads passing the children's output on (JSON logs only)
    if arguments.socket and arguments.port:
        forwarder = TcpForwarder(arguments.address, arguments.port, os.path.abspath(arguments.socket)).start()
    process = _start(command, environment, log, "nbdkit", relays)
    # This node's mirrors are shipped by a process of their own: it reads the log from the
    # files and asks the server (control socket) how far it is durable, so nbdkit's
    # interpreter never waits on a mirror. Restarted if it dies; stopped with the server.
    shipper_command = [sys.executable, "-m", "chunkvol", "--pool", os.path.abspath(arguments.pool),
                       "mirror", "run", "--via-server", "--log-format", arguments.log_format]
    shipper = None if arguments.readonly else _start(shipper_command, environment, log, "shipper", relays)

    def forward(signum, frame):
        process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = None
    while code is None:
        try:
            code = process.wait(timeout=SUPERVISE_SECONDS)
        except subprocess.TimeoutExpired:
            if shipper is not None and shipper.poll() is not None:
                log.event("error", "shipper.restarted",
                          f"the mirror shipper exited ({shipper.returncode}); restarting it",
                          returncode=shipper.returncode)
                shipper = _start(shipper_command, environment, log, "shipper", relays)
    if shipper is not None:
        shipper.terminate()
        try:
            shipper.wait(timeout=30)
        except subprocess.TimeoutExpired:
            shipper.kill()
            shipper.wait()
    if forwarder is not None:
        forwarder.close()
    for relay in relays:
        relay.join(timeout=5)  # the children have exited: their last lines are on the way
    if arguments.socket:
        try:
            os.unlink(os.path.abspath(arguments.socket))  # nbdkit leaves it behind
        except FileNotFoundError:
            pass
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else 1


def _start(command, environment, log, source, relays):
    """Start a child. With JSON logs its stderr comes through a pipe, and every line of it that
    is not an event already (nbdkit's own messages, a traceback) is wrapped in one, so that
    every line serve prints parses; with text logs the child writes to serve's stderr."""
    if log.log_format == "text":
        return subprocess.Popen(command, env=environment)
    child = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True, errors="replace")

    def relay():
        for line in child.stderr:
            log.output_line(source, line)

    relays.append(threading.Thread(target=relay, name=f"relay-{source}", daemon=True))
    relays[-1].start()
    return child


def _print_attach(arguments, log):
    with Pool.open(arguments.pool, readonly=True) as pool:
        names = sorted(pool.volumes)
    volume = arguments.volume or (names[0] if names else "VOLUME")
    lines = [f"chunkvol: serving {len(names)} volume(s) of {os.path.abspath(arguments.pool)}: {', '.join(names)}"]
    if arguments.socket:
        socket = os.path.abspath(arguments.socket)
        lines += [
            f"  nbdinfo 'nbd+unix:///{volume}?socket={socket}'",
            f"  mkdir -p /mnt/{volume} && nbdfuse /mnt/{volume} 'nbd+unix:///{volume}?socket={socket}' &   # then losetup -f --show /mnt/{volume}/nbd",
            f"  nbd-client -unix {socket} -N {volume} /dev/nbd0",
            f"  qemu-system-x86_64 -drive file=nbd+unix:///{volume}?socket={socket},format=raw,if=virtio ...",
        ]
    if arguments.port:
        lines += [f"  nbd-client {arguments.address} {arguments.port} -N {volume} /dev/nbd0",
                  f"  nbdinfo nbd://{arguments.address}:{arguments.port}/{volume}"]
    lines.append("  Ctrl-C or SIGTERM stops the server cleanly.")
    if log.log_format == "json":
        # On stdout, where the text form goes: what a caller of --print-attach reads.
        EventLog("json", stream=sys.stdout).event("info", "serve.attach", lines[0], pool=os.path.abspath(arguments.pool),
                                                  volumes=names, commands=[line.strip() for line in lines[1:-1]])
        return
    print("\n".join(lines), flush=True)
