"""Per-request counts, kept by the nbdkit plugin on the hot path.

prometheus_client's Counter.inc and Histogram.observe take a lock each (about 1 us, several %
of a 20-40 us request), so the plugin does not call them: each connection owns a
ConnectionCounts of plain integers that only its own requests change (nbdkit's serialize
model runs a connection's requests one at a time), and a scrape adds them up (metrics.py).
A request's duration is binned by `elapsed_ns.bit_length()`: bucket k holds the requests that
took under 2**k ns, so binning is one C call and one list increment.
"""

import threading

OPS = ("read", "write", "flush", "zero", "trim")
BUCKET_SLOTS = 64
# The histogram's `le` bounds: 2**13 ns (8.2 us) to 2**35 ns (34 s), a factor of 4 apart (12
# buckets). Faster requests count in the first bucket, slower ones only in +Inf.
FIRST_BUCKET_BITS = 13
LAST_BUCKET_BITS = 35
STEP_BITS = 2


class OpCounts:
    """One operation's durations: buckets[k] = requests that took under 2**k ns."""
    __slots__ = ("buckets", "sum_ns")

    def __init__(self):
        self.buckets = [0] * BUCKET_SLOTS
        self.sum_ns = 0

    def add(self, other):
        for index, count in enumerate(other.buckets):
            self.buckets[index] += count
        self.sum_ns += other.sum_ns


class ConnectionCounts:
    """One connection's counts, written only by its requests."""
    __slots__ = ("volume", "read_bytes", "written_bytes", "flush_points") + OPS  # one attribute per op: no dict lookup

    def __init__(self, volume):
        self.volume = volume
        self.read_bytes = 0
        self.written_bytes = 0
        self.flush_points = 0  # flush requests and writes with FUA: each asks for a flush point
        for op in OPS:
            setattr(self, op, OpCounts())

    @property
    def ops(self):
        return {op: getattr(self, op) for op in OPS}

    def add(self, other):
        self.read_bytes += other.read_bytes
        self.written_bytes += other.written_bytes
        self.flush_points += other.flush_points
        for op in OPS:
            getattr(self, op).add(getattr(other, op))


class RequestCounts:
    """Every connection's counts: those open now, and the totals of those closed."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open = set()
        self.closed = {}  # volume name -> ConnectionCounts, the sum of closed connections

    def connect(self, volume):
        counts = ConnectionCounts(volume)
        with self.lock:
            self.open.add(counts)
        return counts

    def disconnect(self, counts):
        """Called after the connection's last request: its counts go into the closed totals."""
        with self.lock:
            self.open.discard(counts)
            total = self.closed.get(counts.volume)
            if total is None:
                total = self.closed[counts.volume] = ConnectionCounts(counts.volume)
            total.add(counts)

    def totals(self):
        """{volume: ConnectionCounts} summed over all connections, closed and open (an open
        one's figures are read while it may be counting: each is a whole number, not torn)."""
        result = {}
        with self.lock:
            for counts in list(self.closed.values()) + list(self.open):
                total = result.get(counts.volume)
                if total is None:
                    total = result[counts.volume] = ConnectionCounts(counts.volume)
                total.add(counts)
        return result

    def by_op(self):
        """{op: OpCounts} summed over every volume."""
        result = {op: OpCounts() for op in OPS}
        for counts in self.totals().values():
            for op, op_counts in counts.ops.items():
                result[op].add(op_counts)
        return result


def cumulative_buckets(op_counts):
    """[(le in seconds as text, requests that took at most that)] and the +Inf total, in the
    form HistogramMetricFamily takes."""
    buckets = op_counts.buckets
    running = sum(buckets[:FIRST_BUCKET_BITS + 1])
    result = [(repr((1 << FIRST_BUCKET_BITS) / 1e9), running)]
    for bits in range(FIRST_BUCKET_BITS + STEP_BITS, LAST_BUCKET_BITS + 1, STEP_BITS):
        running += sum(buckets[bits - STEP_BITS + 1:bits + 1])
        result.append((repr((1 << bits) / 1e9), running))
    result.append(("+Inf", sum(buckets)))
    return result
