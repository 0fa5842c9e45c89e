"""`serve --http HOST:PORT`: GET /metrics (Prometheus text format) and GET / (the status
page), from a thread of nbdkit's process. It reads and never changes the pool: there is no
other method and no other path. The listening socket comes from network.py, the seam for
sockets."""

import http.server
import threading

from chunkvol.monitor.figures import PoolFigures
from chunkvol.monitor.metrics import ChunkvolCollector, exposition, metrics_registry
from chunkvol.monitor.page import render
from chunkvol.monitor.sampler import SAMPLE_SECONDS, LagSampler
from chunkvol.network import Network

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MonitorServer:
    def __init__(self, pool, host, port, requests, failures, receiver=None, network=None,
                 sample_seconds=SAMPLE_SECONDS):
        self.figures = PoolFigures(pool)
        self.sampler = LagSampler(self.figures, sample_seconds)
        self.registry = metrics_registry(ChunkvolCollector(self.figures, requests, failures, self.sampler, receiver))
        listener = (network or Network()).listen(host, port)
        self.server = http.server.ThreadingHTTPServer(listener.getsockname()[:2], self.handler(),
                                                      bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = listener
        self.server.daemon_threads = True
        self.port = listener.getsockname()[1]
        self.thread = None

    def handler(self):
        monitor = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "chunkvol"

            def do_GET(self):  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self.reply(200, METRICS_TYPE, exposition(monitor.registry))
                elif path == "/":
                    self.reply(200, "text/html; charset=utf-8", render(monitor.figures, monitor.sampler).encode())
                else:
                    self.reply(404, "text/plain; charset=utf-8", b"not found: try / or /metrics\n")

            def do_HEAD(self):  # noqa: N802
                self.reply(200 if self.path.split("?", 1)[0] in ("/", "/metrics") else 404, "text/plain", b"",
                           length=0)

            def reply(self, status, content_type, body, length=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *arguments):  # noqa: A002 (http.server's signature)
                pass  # a scrape every few seconds is not an event worth a log line

        return Handler

    def start(self):
        self.sampler.start()
        self.thread = threading.Thread(target=self.server.serve_forever, name="chunkvol-http", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.sampler.stop()
