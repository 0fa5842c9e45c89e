"""The pool's figures for /metrics and the status page, read from the server's open pool
without changing it: `status --json`'s report (cli/status_command.py), each mirror's and
peer's lag as `mirror status` computes it (mirror/shipper.py, Shipper.status), and the
incoming lag a peer reports about itself (what `peer status` shows)."""

import time

from chunkvol import history
from chunkvol.cli.status_command import collect
from chunkvol.errors import ChunkvolError
from chunkvol.mirror import config as mirror_config
from chunkvol.mirror import targets
from chunkvol.mirror.shipper import Shipper

TIMELINE_POINTS = 400  # flush points drawn per volume: the newest ones
# A report holds the pool lock while it walks the map: on a big, busy pool that is a stall
# of every request. After a walk that took t seconds, the next waits REPORT_DUTY * t
# (at most 1/REPORT_DUTY of the lock's time goes to reports, whoever scrapes how often).
REPORT_DUTY = 20


class PoolFigures:
    """Reads one open pool's figures. A report walks every written group under the pool lock
    (space.py): it is made again only when the log has moved or a chunk was evicted since the
    last one, so scrapes of an idle pool cost requests nothing, and not before REPORT_DUTY
    times the last walk's duration has passed, so a busy one loses at most 5 % to them."""

    def __init__(self, pool):
        self.pool = pool
        self.report = None
        self.report_key = None
        self.next_report = 0.0  # time.monotonic() before which the last report stands

    def pool_report(self):
        """`chunkvol status --json`'s report, plus each volume's conflicts and timeline."""
        pool = self.pool
        with pool.lock:  # the chunk table and the volumes stay as they are meanwhile
            chunks = pool.chunks.ids()
            key = (pool.writer.position, tuple(pool.chunks.get(each).remote is None for each in chunks))
            if key != self.report_key and time.monotonic() >= self.next_report:
                started = time.monotonic()
                report = collect(pool)
                for name, volume in report["volumes"].items():
                    info = pool.volume_info(name)
                    volume["conflicts"] = len(pool.blockmap.conflicts(info.volume_id))
                    volume["flush_points"] = history.history_rows(pool, name)[-TIMELINE_POINTS:]
                    volume["snapshot_list"] = sorted(
                        ({"name": s["name"], "stamp": s["stamp"], "time": history.format_stamp(s["stamp"])}
                         for s in pool.snapshots.get(info.volume_id, {}).values()), key=lambda s: s["stamp"])
                self.report, self.report_key = report, key
                self.next_report = time.monotonic() + REPORT_DUTY * (time.monotonic() - started)
            return self.report

    def horizon(self):
        with self.pool.lock:
            return self.pool.writer.durable_address, self.pool.next_sequence

    def mirror_rows(self):
        """Shipper.status of every mirror and peer (peers marked `peer`), against the log as
        far as it is durable now; the cursor and figures come from the shipper's state file."""
        durable, next_sequence = self.horizon()
        rows = []
        for name, definition in sorted(mirror_config.load_mirrors(self.pool.path, self.pool.files).items()):
            shipper = Shipper(self.pool.path, self.pool.fields, name, definition, files=self.pool.files)
            try:
                row = shipper.status(durable, next_sequence)
            finally:
                shipper.close()
            row["peer"] = bool(definition.get("peer"))
            row["node"] = definition.get("node")
            rows.append(row)
        return rows

    def incoming_lag(self, definition):
        """Bytes of a peer's records not yet here, as the peer reports it (`peer status`'s
        "from it"), 0 when we hold every one: connects to the peer; None when it cannot be
        reached."""
        try:
            link = targets.open_target(definition["to"], self.pool.fields, self.pool.path)
        except (ChunkvolError, OSError):
            return None
        try:
            status, node = link.status, link.peer
        finally:
            link.close()
        behind = status.get("bytes_behind")
        if not isinstance(behind, int):
            return None
        with self.pool.lock:
            held = self.pool.origins.get(node, 0)
        # Every record of theirs is here: their count past their cursor is ours (as above).
        return 0 if status.get("next_sequence", 1) - 1 <= held else behind
