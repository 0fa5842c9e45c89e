"""Hybrid logical clock: wall-clock milliseconds << 16 | a counter.

Stamps from one node strictly increase even if the wall clock steps back; observing a stamp
from the log (or a peer) moves the clock past it, so a write that follows another one it has
seen always carries the greater stamp.

The low NODE_BITS of the counter are the node's index in its pool (node id mod 16, unique
among the nodes of a pool: `join-file` picks ids so), and the counter moves in steps of 16:
no two nodes ever make the same stamp, so the stamp alone orders every write of a pool, and
names the node that made it (`node_index_of`).
"""

import time

COUNTER_BITS = 16
NODE_BITS = 4
NODE_MASK = (1 << NODE_BITS) - 1
MAX_NODES = 1 << NODE_BITS


def hlc_to_seconds(hlc):
    return (hlc >> COUNTER_BITS) / 1000.0


def node_index(node_id):
    return node_id & NODE_MASK


def node_index_of(hlc):
    return hlc & NODE_MASK


def new_node_id(taken_ids=()):
    """A random node id whose index no node in `taken_ids` has (None when all 16 are used)."""
    import os
    taken = {node_index(node_id) for node_id in taken_ids}
    if len(taken) >= MAX_NODES:
        return None
    while True:
        node_id = int.from_bytes(os.urandom(4), "little")
        if node_id and node_index(node_id) not in taken:
            return node_id


class HybridClock:
    __slots__ = ("last", "wall", "index")

    def __init__(self, last=0, wall=time.time_ns, index=0):
        self.last = last
        self.wall = wall
        self.index = index

    def now(self):
        physical = (self.wall() // 1_000_000) << COUNTER_BITS | self.index
        if physical > self.last:
            self.last = physical
        else:
            self.last = (((self.last >> NODE_BITS) + 1) << NODE_BITS) | self.index
        return self.last

    def observe(self, hlc):
        if hlc > self.last:
            self.last = hlc
