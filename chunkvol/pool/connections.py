"""Who uses the pool's volumes now: the open NBD connections to each volume, and the past
points they read. A volume in use is not removed; a point being read is held as a snapshot
is (prune keeps it)."""


class Connections:
    """Counts under the pool's lock (`lock`), so a removal and an attach never cross."""

    def __init__(self, lock):
        self.lock = lock
        self.users = {}  # volume name -> (open connections to it or its points, to it live)
        self.points_read = {}  # volume_id -> {stamp: open connections reading the volume as of it}

    def attach(self, name, live=True, point=None):
        """A connection opened the volume (live=False: one of its past points, `point`, a
        history.Point)."""
        with self.lock:
            count, live_count = self.users.get(name, (0, 0))
            self.users[name] = (count + 1, live_count + (1 if live else 0))
            if point is not None:
                held = self.points_read.setdefault(point.info.volume_id, {})
                held[point.stamp] = held.get(point.stamp, 0) + 1

    def detach(self, name, live=True, point=None):
        with self.lock:
            count, live_count = self.users.get(name, (0, 0))
            self.users[name] = (max(0, count - 1), max(0, live_count - (1 if live else 0)))
            held = self.points_read.get(point.info.volume_id, {}) if point is not None else {}
            if point is not None and point.stamp in held:
                held[point.stamp] -= 1
                if not held[point.stamp]:
                    del held[point.stamp]

    def count(self, name, live_only=False):
        """Open connections to the volume (and its points, unless `live_only`)."""
        return self.users.get(name, (0, 0))[1 if live_only else 0]

    def points_being_read(self, volume_id):
        """Stamps of the volume's past points that open connections read now."""
        with self.lock:
            return sorted(self.points_read.get(volume_id, ()))
