"""Lag over time, for the status page's charts: a thread samples every mirror's and peer's
lag every SAMPLE_SECONDS into a ring that holds the last hour, so the page draws it without
asking anything of the mirrors itself."""

import collections
import threading
import time

from chunkvol.errors import ChunkvolError

SAMPLE_SECONDS = 10.0
WINDOW_SECONDS = 3600.0


class Sample:
    __slots__ = ("time", "lags")

    def __init__(self, when, lags):
        self.time = when  # Unix time
        self.lags = lags  # {(kind, name): (bytes behind, seconds behind or None)}; kind: mirror, peer-out, peer-in


class LagSampler:
    def __init__(self, figures, sample_seconds=SAMPLE_SECONDS, window_seconds=WINDOW_SECONDS):
        self.figures = figures
        self.sample_seconds = sample_seconds
        self.ring = collections.deque(maxlen=max(1, int(window_seconds / sample_seconds)))
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = None
        self.last_error = None

    def start(self):
        self.thread = threading.Thread(target=self.run, name="chunkvol-lag-sampler", daemon=True)
        self.thread.start()
        return self

    def run(self):
        while True:
            self.sample()
            if self.stopping.wait(self.sample_seconds):
                return

    def sample(self):
        """One sample of every lag; a failure is kept for the page, and the next try comes."""
        try:
            lags = {}
            for row in self.figures.mirror_rows():
                if row["peer"]:
                    lags[("peer-out", row["name"])] = (row["bytes_behind"], row["seconds_behind"])
                    incoming = self.figures.incoming_lag({"to": row["to"]})
                    if incoming is not None:
                        lags[("peer-in", row["name"])] = (incoming, None)
                else:
                    lags[("mirror", row["name"])] = (row["bytes_behind"], row["seconds_behind"])
            self.last_error = None
        except (ChunkvolError, OSError) as error:
            self.last_error = str(error)
            return
        with self.lock:
            self.ring.append(Sample(time.time(), lags))

    def samples(self):
        with self.lock:
            return list(self.ring)

    def latest_incoming(self):
        """{peer name: bytes} of the newest sample: a scrape does not connect to peers."""
        with self.lock:
            newest = self.ring[-1] if self.ring else None
        if newest is None:
            return {}
        return {name: value[0] for (kind, name), value in newest.lags.items() if kind == "peer-in"}

    def stop(self):
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
