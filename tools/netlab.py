"""A slow, lossy link to a network namespace, for mirror tests and figures (no netem here).

    with SlowLink(rate="16mbit", loss=0.02) as link:
        link.run(["chunkvol", "--pool", P, "receive", "--listen", f"{link.inner}:10900"])
        # from this namespace, connect to link.inner:10900

A namespace and a veth pair: this side `outer` (10.77.N.1), the namespace's side `inner`
(10.77.N.2). `tc tbf` shapes both directions to `rate`; iptables `statistic` drops `loss` of
the packets arriving in the namespace; `partition()` / `heal()` drop everything / stop that.
Everything is removed on exit, also when the test fails. Needs root (CAP_NET_ADMIN).
"""

import os
import subprocess


def _ip(*arguments):
    subprocess.run(["ip", *arguments], check=True, capture_output=True)


class SlowLink:
    def __init__(self, rate="16mbit", loss=0.0, index=None):
        number = index if index is not None else os.getpid() % 200 + 20
        self.namespace = f"cvlab{number}"
        self.outer_device, self.inner_device = f"cvo{number}", f"cvi{number}"
        self.outer, self.inner = f"10.77.{number}.1", f"10.77.{number}.2"
        self.rate, self.loss = rate, loss
        self.processes = []

    def __enter__(self):
        self.close()  # leftovers of a run that was killed
        _ip("netns", "add", self.namespace)
        _ip("link", "add", self.outer_device, "type", "veth", "peer", "name", self.inner_device)
        _ip("link", "set", self.inner_device, "netns", self.namespace)
        _ip("addr", "add", f"{self.outer}/24", "dev", self.outer_device)
        _ip("link", "set", self.outer_device, "up")
        self.inside(["ip", "addr", "add", f"{self.inner}/24", "dev", self.inner_device])
        self.inside(["ip", "link", "set", self.inner_device, "up"])
        self.inside(["ip", "link", "set", "lo", "up"])
        if self.rate:
            shape = ["root", "tbf", "rate", self.rate, "burst", "32kbit", "latency", "400ms"]
            subprocess.run(["tc", "qdisc", "add", "dev", self.outer_device, *shape], check=True, capture_output=True)
            self.inside(["tc", "qdisc", "add", "dev", self.inner_device, *shape])
        if self.loss:
            self.inside(["iptables", "-A", "INPUT", "-i", self.inner_device, "-m", "statistic", "--mode", "random",
                         "--probability", str(self.loss), "-j", "DROP"])
        return self

    def inside(self, command):
        subprocess.run(["ip", "netns", "exec", self.namespace, *command], check=True, capture_output=True)

    def run(self, command, **options):
        """Start a process inside the namespace; stopped on exit."""
        process = subprocess.Popen(["ip", "netns", "exec", self.namespace, *command], **options)
        self.processes.append(process)
        return process

    def partition(self):
        self.inside(["iptables", "-I", "INPUT", "1", "-i", self.inner_device, "-j", "DROP"])

    def heal(self):
        self.inside(["iptables", "-D", "INPUT", "-i", self.inner_device, "-j", "DROP"])

    def close(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        self.processes = []
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.outer_device], capture_output=True)

    def __exit__(self, *exc):
        self.close()


class DelayProxy:
    """A TCP proxy that holds every chunk of bytes `delay` seconds each way (latency, which
    tbf does not give), in this namespace: listen on 127.0.0.1:port, forward to target."""

    def __init__(self, target_host, target_port, delay):
        import socket
        import threading
        self.socket_module, self.threading = socket, threading
        self.target = (target_host, target_port)
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = self.socket_module.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for source, sink in ((client, upstream), (upstream, client)):
                self.threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink):
        import collections
        import time
        pending = collections.deque()
        ready = self.threading.Condition()
        finished = []

        def send():
            while True:
                with ready:
                    while not pending and not finished:
                        ready.wait()
                    if not pending:
                        break
                    due, data = pending.popleft()
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    sink.sendall(data)
                except OSError:
                    break
            try:
                sink.shutdown(self.socket_module.SHUT_WR)
            except OSError:
                pass

        sender = self.threading.Thread(target=send, daemon=True)
        sender.start()
        while True:
            try:
                data = source.recv(1 << 16)
            except OSError:
                data = b""
            with ready:
                if not data:
                    finished.append(True)
                else:
                    pending.append((time.monotonic() + self.delay, data))
                ready.notify()
            if not data:
                break
        sender.join()

    def close(self):
        self.closing = True
        self.listener.close()
