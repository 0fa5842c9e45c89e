"""Hybrid logical clock: wall-clock milliseconds << 16 | a counter.

Stamps from one node strictly increase even if the wall clock steps back; observing a stamp
from the log (or a peer) moves the clock past it. Ties between nodes are broken by node id.
"""

import time

COUNTER_BITS = 16


def hlc_to_seconds(hlc):
    return (hlc >> COUNTER_BITS) / 1000.0


class HybridClock:
    __slots__ = ("last", "wall")

    def __init__(self, last=0, wall=time.time_ns):
        self.last = last
        self.wall = wall

    def now(self):
        physical = (self.wall() // 1_000_000) << COUNTER_BITS
        self.last = physical if physical > self.last else self.last + 1
        return self.last

    def observe(self, hlc):
        if hlc > self.last:
            self.last = hlc
