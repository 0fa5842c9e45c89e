"""`serve --http`, `--log-format json` and the systemd unit (issue 18), through a real
`chunkvol serve`, a real NBD client (libnbd), a real browser (chromium) and systemd-analyze."""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import nbd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chunkvol.mirror import config as mirror_config
from chunkvol.monitor.counters import OpCounts, cumulative_buckets
from tests.support.mirrors import status
from tests.support.paths import ROOT
from tests.support.server import CHUNKVOL, ENVIRONMENT, chunkvol

MiB = 1 << 20


def _free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """`chunkvol serve --socket --http` on loopback, stopped by its process id."""

    def __init__(self, pool, tmp_path, *options):
        self.socket_path = str(tmp_path / "serve.sock")
        self.port = _free_port()
        self.stdout_path, self.stderr_path = str(tmp_path / "serve.out"), str(tmp_path / "serve.err")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen([CHUNKVOL, "--pool", pool, "serve", "--socket", self.socket_path,
                                             "--http", f"127.0.0.1:{self.port}", *options],
                                            stdout=out, stderr=err, env=ENVIRONMENT)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, f"serve exited: {self.output()}"
            try:
                self.get("/metrics")
                self.client().shutdown()
                return
            except (OSError, nbd.Error):
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"serve did not come up: {self.output()}")
                time.sleep(0.1)

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()

    def metrics(self):
        """{(name, sorted labels): value} of every sample on /metrics."""
        _, content_type, body = self.get("/metrics")
        assert content_type.startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def client(self, volume="disk0"):
        handle = nbd.NBD()
        handle.connect_uri(f"nbd+unix:///{volume}?socket={self.socket_path}")
        return handle

    def output(self):
        with open(self.stdout_path) as out, open(self.stderr_path) as err:
            return out.read() + err.read()

    def stop(self):
        """SIGTERM; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(pool, *options):
        servers.append(Served(pool, tmp_path, *options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _one(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_follow_real_requests_and_a_throttled_mirror_that_lags_then_catches_up(pool_path, tmp_path, serve):
    # 4K/s: after its first batch the mirror may send the next one only size/4096 seconds
    # later (256 s for 1 MiB), so the second flush interval is still behind when scraped.
    chunkvol("--pool", pool_path, "mirror", "add", "far", "--to", f"dir:{tmp_path / 'mirror'}", "--bandwidth", "4K")
    server = serve(pool_path)
    client = client_writes = None
    try:
        client = server.client()
        first, second = os.urandom(MiB), os.urandom(MiB)
        client.pwrite(first, 0)
        client.flush()
        client.pwrite(second, 8 * MiB, nbd.CMD_FLAG_FUA)
        client.zero(64 * 1024, 16 * MiB)
        client.trim(64 * 1024, 20 * MiB)
        client.flush()
        assert client.pread(MiB, 0) == first
        assert client.pread(4096, 8 * MiB) == second[:4096]
        client_writes = 2
    finally:
        if client is not None:
            client.shutdown()
    lagging = server.metrics()
    assert _one(lagging, "chunkvol_volume_written_bytes_total", volume="disk0") == 2 * MiB
    assert _one(lagging, "chunkvol_volume_read_bytes_total", volume="disk0") == MiB + 4096
    assert _one(lagging, "chunkvol_flush_points_total", volume="disk0") == 3  # two flushes, one FUA write
    for op, count in (("write", client_writes), ("read", 2), ("flush", 2), ("zero", 1), ("trim", 1)):
        assert _one(lagging, "chunkvol_request_duration_seconds_count", op=op) == count
        assert _one(lagging, "chunkvol_request_duration_seconds_bucket", op=op, le="+Inf") == count
        assert _one(lagging, "chunkvol_request_duration_seconds_sum", op=op) > 0
    assert _one(lagging, "chunkvol_mirror_behind_bytes", mirror="far") >= MiB
    assert _one(lagging, "chunkvol_mirror_behind_seconds", mirror="far") > 0
    assert _one(lagging, "chunkvol_pool_stored_bytes") >= 2 * MiB
    assert 2 * MiB <= _one(lagging, "chunkvol_pool_live_bytes") <= _one(lagging, "chunkvol_pool_stored_bytes")
    assert _one(lagging, "chunkvol_chunks", state="local") >= 1
    assert _one(lagging, "chunkvol_chunks", state="evicted") == 0
    assert _one(lagging, "chunkvol_conflicts_total", volume="disk0") == 0
    for kind in ("io", "corruption", "peer", "store"):
        assert _one(lagging, "chunkvol_errors_total", kind=kind) == 0

    # Lift the limit: serve's shipper picks up the new definition and catches up.
    mirrors = mirror_config.load_mirrors(pool_path)
    mirrors["far"]["bandwidth"] = None
    mirror_config.save_mirrors(pool_path, mirrors)
    deadline = time.monotonic() + 120
    while status(pool_path, "far")["bytes_behind"] > 0:
        assert time.monotonic() < deadline, "the mirror did not catch up"
        time.sleep(0.2)
    caught_up = server.metrics()
    assert _one(caught_up, "chunkvol_mirror_behind_bytes", mirror="far") == 0
    assert _one(caught_up, "chunkvol_mirror_behind_seconds", mirror="far") == 0
    shipped = status(pool_path, "far")["shipped_bytes"]
    assert _one(caught_up, "chunkvol_mirror_shipped_bytes_total", mirror="far") == shipped >= 2 * MiB
    assert _one(caught_up, "chunkvol_volume_written_bytes_total", volume="disk0") == 2 * MiB
    assert server.stop() == 0


def test_the_http_listener_changes_nothing_and_knows_only_two_paths(pool_path, serve):
    server = serve(pool_path)
    with pytest.raises(urllib.error.HTTPError) as missing:
        server.get("/volume/disk0/remove")
    assert missing.value.code == 404
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(request, timeout=30)
    assert posted.value.code == 501
    assert server.stop() == 0


def _browser(*arguments):
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1100,1300", *arguments], capture_output=True, timeout=120,
                          env=dict(ENVIRONMENT, HOME=os.environ.get("HOME", "/root")))


def test_the_status_page_draws_its_charts_in_headless_chromium(tmp_path, serve):
    pool = str(tmp_path / "pool <&> one")  # a path the page must escape
    chunkvol("--pool", pool, "init", "--chunk-size", "16M")
    chunkvol("--pool", pool, "volume", "create", "disk0", "--size", "64M")
    chunkvol("--pool", pool, "mirror", "add", "far", "--to", f"dir:{tmp_path / 'mirror'}", "--bandwidth", "4K")
    server = serve(pool)
    client = server.client()
    try:
        for index in range(20):  # every MiB written twice: two chunks, the first half dead
            client.pwrite(os.urandom(MiB), index % 10 * MiB)
            client.flush()
    finally:
        client.shutdown()
    chunkvol("--pool", pool, "snapshot", "create", "disk0@before")
    _, content_type, body = server.get("/")
    page = body.decode()
    assert content_type.startswith("text/html")
    assert "pool &lt;&amp;&gt; one" in page and "<&>" not in page
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")

    dom = _browser("--dump-dom", f"http://127.0.0.1:{server.port}/")
    assert dom.returncode == 0, dom.stderr
    text = dom.stdout.decode()
    assert 'class="chart timeline"' in text and 'class="flush-point"' in text and 'class="snapshot"' in text
    assert 'class="chart lag-chart"' in text and 'class="lag-line"' in text
    assert 'class="chart chunk-map"' in text and text.count('<g class="chunk') >= 2
    assert 'data-chunk="1" data-live="0.' in text  # overwritten data: part of chunk 1 is dead
    screenshot = tmp_path / "status.png"
    shot = _browser(f"--screenshot={screenshot}", f"http://127.0.0.1:{server.port}/")
    assert shot.returncode == 0, shot.stderr
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a blank page of this size is ~5 KB
    if os.environ.get("CHUNKVOL_SCREENSHOT"):  # how docs/monitoring-status-page.png is made
        shutil.copy(screenshot, os.environ["CHUNKVOL_SCREENSHOT"])
    assert server.stop() == 0


def test_json_logs_every_line_of_a_serve_with_mirrors_parses(pool_path, tmp_path, serve):
    """A dir: mirror that ships and a node: mirror nobody answers (the shipper logs it
    unreachable): every line serve prints, on stdout and stderr, is one JSON event; SIGTERM
    stops it with 0, the socket and the HTTP port closed."""
    chunkvol("--pool", pool_path, "mirror", "add", "near", "--to", f"dir:{tmp_path / 'mirror'}")
    chunkvol("--pool", pool_path, "mirror", "add", "gone", "--to", f"node:127.0.0.1:{_free_port()}")
    server = serve(pool_path, "--log-format", "json", "--print-attach")
    client = server.client()
    try:
        client.pwrite(os.urandom(MiB), 0)
        client.flush()
    finally:
        client.shutdown()
    deadline = time.monotonic() + 60
    while '"mirror.unreachable"' not in server.output() or status(pool_path, "near")["bytes_behind"]:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.2)
    assert server.stop() == 0
    assert not os.path.exists(server.socket_path)
    with pytest.raises(OSError):
        server.get("/metrics")
    events = []
    for line in server.output().splitlines():
        event = json.loads(line)
        assert set(event) == {"time", "level", "event", "fields"}, line
        assert event["level"] in ("info", "warning", "error") and "message" in event["fields"]
        events.append(event)
    names = {event["event"] for event in events}
    assert {"serve.attach", "http.listening", "mirror.unreachable"} <= names
    unreachable = next(event for event in events if event["event"] == "mirror.unreachable")
    assert unreachable["fields"]["mirror"] == "gone"
    errors = {kind: count for kind, count in json.loads(
        (open(_shipper_errors(pool_path), "rb").read())).items()}
    assert errors["peer"] >= 1  # the node: mirror's failures, as /metrics would add them


def _shipper_errors(pool_path):
    from chunkvol.monitor.errors import shipper_counts_path
    return shipper_counts_path(pool_path)


def test_the_systemd_unit_verifies_as_make_install_service_installs_it(tmp_path):
    """systemd-analyze verify needs ExecStart's program to exist: the unit says
    /usr/local/bin/chunkvol, and `make install-service` points it at this checkout's."""
    source = open(os.path.join(ROOT, "contrib", "systemd", "chunkvol@.service")).read()
    assert "ExecStart=/usr/local/bin/chunkvol --pool %f serve " in source
    assert "Restart=on-failure" in source and "KillMode=mixed" in source and "KillSignal=SIGTERM" in source
    installed_dir = tmp_path / "units"
    installed_dir.mkdir()
    # -o install: the venv is there already (make test made it); only the unit is installed.
    subprocess.run(["make", "-s", "-C", ROOT, "-o", "install", "install-service", f"SYSTEMD_UNIT_DIR={installed_dir}"],
                   check=True, capture_output=True)
    installed = (installed_dir / "chunkvol@.service").read_text()
    assert f"ExecStart={ROOT}/.venv/bin/chunkvol --pool %f serve " in installed
    instance = subprocess.run(["systemd-escape", "--path", str(tmp_path / "pool")], capture_output=True, text=True,
                              check=True).stdout.strip()
    unit = tmp_path / f"chunkvol@{instance}.service"
    unit.write_text(installed)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    broken = tmp_path / f"broken@{instance}.service"
    broken.write_text(source)  # /usr/local/bin/chunkvol is not there: verify must say so
    if not os.path.exists("/usr/local/bin/chunkvol"):
        assert subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True).returncode != 0


def test_durations_fall_in_power_of_two_buckets():
    counts = OpCounts()
    for elapsed in (5_000, 8_191, 8_192, 100_000, 10**12):  # ns; the last beyond every bucket
        counts.buckets[elapsed.bit_length()] += 1
        counts.sum_ns += elapsed
    buckets = dict(cumulative_buckets(counts))
    assert buckets[repr(2**13 / 1e9)] == 2  # 5 us and 8.191 us are under 8.192 us
    assert buckets[repr(2**15 / 1e9)] == 3
    assert buckets[repr(2**17 / 1e9)] == 4  # 100 us < 131 us
    assert buckets[repr(2**35 / 1e9)] == 4
    assert buckets["+Inf"] == 5
