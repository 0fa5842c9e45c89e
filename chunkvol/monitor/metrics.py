"""/metrics: a prometheus_client collector that reads every figure at scrape time, from the
plugin's plain counters (counters.py), the pool (figures.py), the lag sampler and the error
counts, in a registry of its own (the process-wide default one would add this process's
Python and GC metrics, which say nothing about the pool).

The names and labels are an interface (README, "Monitoring"); tests/monitor checks them.
"""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from chunkvol.errors import ChunkvolError
from chunkvol.monitor.counters import OPS, ConnectionCounts, cumulative_buckets
from chunkvol.monitor.errors import KINDS, read_counts, shipper_counts_path


class ChunkvolCollector:
    def __init__(self, figures, requests, failures, sampler, receiver=None):
        self.figures = figures
        self.requests = requests
        self.failures = failures
        self.sampler = sampler
        self.receiver = receiver
        self.shipper_errors = shipper_counts_path(figures.pool.path)

    def collect(self):
        report = self.figures.pool_report()
        yield from self.volume_families(report["volumes"])
        yield from self.pool_families(report)
        yield from self.mirror_families()
        yield self.error_family()

    def volume_families(self, volumes):
        totals = self.requests.totals()
        for name in volumes:  # a volume nobody has opened yet reads 0, not absent
            totals.setdefault(name, ConnectionCounts(name))
        read = CounterMetricFamily("chunkvol_volume_read_bytes_total", "Bytes read by NBD clients",
                                   labels=["volume"])
        written = CounterMetricFamily("chunkvol_volume_written_bytes_total", "Bytes written by NBD clients",
                                      labels=["volume"])
        flush_points = CounterMetricFamily("chunkvol_flush_points_total",
                                           "Flush points NBD clients asked for (FLUSH, or a request with FUA)",
                                           labels=["volume"])
        for volume, counts in sorted(totals.items()):
            read.add_metric([volume], counts.read_bytes)
            written.add_metric([volume], counts.written_bytes)
            flush_points.add_metric([volume], counts.flush_points)
        duration = HistogramMetricFamily("chunkvol_request_duration_seconds",
                                         "Time the server spent on an NBD request, by operation", labels=["op"])
        by_op = self.requests.by_op()
        for op in OPS:
            duration.add_metric([op], cumulative_buckets(by_op[op]), sum_value=by_op[op].sum_ns / 1e9)
        return [read, written, flush_points, duration]

    def pool_families(self, report):
        stored = GaugeMetricFamily("chunkvol_pool_stored_bytes", "Bytes of log the pool's chunks hold")
        stored.add_metric([], report["log"]["written_bytes"])
        live = GaugeMetricFamily("chunkvol_pool_live_bytes", "Bytes of log the volumes' live data uses")
        live.add_metric([], report["log"]["live_bytes"])
        chunks = GaugeMetricFamily("chunkvol_chunks", "Chunks, by where their data is", labels=["state"])
        evicted = sum(1 for chunk in report["chunks"] if chunk["evicted_to"])
        chunks.add_metric(["local"], len(report["chunks"]) - evicted)
        chunks.add_metric(["evicted"], evicted)
        conflicts = CounterMetricFamily("chunkvol_conflicts_total",
                                        "Block ranges two nodes wrote concurrently (last writer won)",
                                        labels=["volume"])
        for name, volume in sorted(report["volumes"].items()):
            conflicts.add_metric([name], volume["conflicts"])
        return [stored, live, chunks, conflicts]

    def mirror_families(self):
        behind_bytes = GaugeMetricFamily("chunkvol_mirror_behind_bytes",
                                         "Bytes of durable log a mirror does not have yet", labels=["mirror"])
        behind_seconds = GaugeMetricFamily("chunkvol_mirror_behind_seconds",
                                           "Age of the oldest record a mirror does not have yet", labels=["mirror"])
        shipped = CounterMetricFamily("chunkvol_mirror_shipped_bytes_total",
                                      "Bytes of records a mirror acknowledged", labels=["mirror"])
        peer_behind = GaugeMetricFamily("chunkvol_peer_behind_bytes",
                                        "Bytes a peer lacks of this node's log (out), or this node of the "
                                        "peer's (in, as the peer last reported it)", labels=["peer", "direction"])
        try:
            rows = self.figures.mirror_rows()
        except (ChunkvolError, OSError):
            rows = []  # a damaged mirror definition or state file: the rest is still served
        incoming = self.sampler.latest_incoming() if self.sampler is not None else {}
        for row in rows:
            if row["peer"]:
                peer_behind.add_metric([row["name"], "out"], row["bytes_behind"])
                if row["name"] in incoming:
                    peer_behind.add_metric([row["name"], "in"], incoming[row["name"]])
                continue
            behind_bytes.add_metric([row["name"]], row["bytes_behind"])
            behind_seconds.add_metric([row["name"]], row["seconds_behind"])
            shipped.add_metric([row["name"]], row["shipped_bytes"])
        return [behind_bytes, behind_seconds, shipped, peer_behind]

    def error_family(self):
        counts = self.failures.snapshot()
        for kind, count in read_counts(self.shipper_errors).items():
            counts[kind] += count
        if self.receiver is not None:
            counts["peer"] += self.receiver.refused
        family = CounterMetricFamily("chunkvol_errors_total", "Failures, by kind", labels=["kind"])
        for kind in KINDS:
            family.add_metric([kind], counts[kind])
        return family


def metrics_registry(collector):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry):
    """The Prometheus text format of everything in `registry`."""
    return generate_latest(registry)
