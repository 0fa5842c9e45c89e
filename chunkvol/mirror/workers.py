"""`mirror run`'s shipping threads: one per mirror, so that a slow or unreachable mirror (an
object store retrying for 20 s, a peer behind a partition waiting out its dead-link timeout)
never holds up the others. The caller learns how far the log is durable and offers that
horizon to every worker; each ships up to the newest horizon it was offered, and after a
failure waits out its own backoff.

`say(level, event, message, **fields)` gets the worker's log lines (monitor/log.py's
EventLog.event); `failed(error)`, if given, hears of every failed try (the error counts)."""

import threading

from chunkvol.errors import ChunkvolError, UnreachableError
from chunkvol.mirror.shipper import Shipper

MAX_BACKOFF_SECONDS = 30.0
# An unreachable mirror is tried again this soon after a failed try (a connection attempt
# itself gives up after node_link.CONNECT_SECONDS), so that replication resumes within
# seconds of a link coming back; a refusal (wrong pool, bad credentials, damage) waits the
# longer MAX_BACKOFF_SECONDS between tries.
MAX_UNREACHABLE_BACKOFF_SECONDS = 2.0


class MirrorWorker:
    def __init__(self, pool_path, fields, name, definition, say, network=None, failed=None):
        self.name = name
        self.definition = definition
        self.say = say
        self.failed = failed
        self.shipper = Shipper(pool_path, fields, name, definition, network=network)
        self.stopping = threading.Event()
        self.wake = threading.Condition()
        self.horizon = None
        self.crashed = None  # an unexpected error ends the thread; `mirror run` then exits with it
        self.thread = threading.Thread(target=self._run, name=f"mirror {name}", daemon=True)
        self.thread.start()

    def offer(self, durable):
        """Ship up to `durable` (a log address) next; a newer offer replaces an older one."""
        with self.wake:
            self.horizon = durable
            self.wake.notify()

    def stop(self):
        self.stopping.set()
        with self.wake:
            self.wake.notify()

    def join(self, timeout):
        self.thread.join(timeout)

    def _next_horizon(self, shipped_to):
        with self.wake:
            while not self.stopping.is_set() and self.horizon in (None, shipped_to):
                self.wake.wait()
            return self.horizon

    def _run(self):
        backoff, said, shipped_to = 0.0, None, None
        try:
            while True:
                horizon = self._next_horizon(shipped_to)
                if self.stopping.is_set():
                    return
                try:
                    self.shipper.ship(horizon, stop=self.stopping)
                except (ChunkvolError, OSError) as error:
                    unreachable = isinstance(error, UnreachableError)
                    ceiling = MAX_UNREACHABLE_BACKOFF_SECONDS if unreachable else MAX_BACKOFF_SECONDS
                    backoff = min(ceiling, max(1.0, backoff * 2))
                    if self.failed is not None:
                        self.failed(error)
                    if said != str(error):  # a link that stays down: said once, not every try
                        kind = "unreachable" if unreachable else "failed"
                        self.say("warning" if unreachable else "error", f"mirror.{kind}",
                                 f"mirror {self.name} {kind}: {error}; retrying, at most {ceiling:.0f}s apart",
                                 mirror=self.name, error=str(error), error_kind=type(error).__name__)
                        said = str(error)
                    self.stopping.wait(backoff)
                    continue
                shipped_to, backoff = horizon, 0.0
                if said is not None:
                    self.say("info", "mirror.resumed", f"mirror {self.name} is shipping again", mirror=self.name)
                    said = None
        except BaseException as error:
            self.crashed = error
        finally:
            self.shipper.close()
