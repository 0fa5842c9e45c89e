"""The lines `serve` and its shipper print, as text (what they always printed) or, with
`--log-format json`, as one JSON object per line:

    {"time": "2026-12-09T10:04:05.123Z", "level": "warning", "event": "mirror.unreachable",
     "fields": {"message": "mirror far unreachable: ...", "mirror": "far"}}

`level` is info, warning or error; `event` a dotted name that scripts can match; `fields`
always holds the text line's `message`, and whatever else the event names.
"""

import json
import sys
import threading
import time

FORMATS = ("text", "json")
LEVELS = ("info", "warning", "error")


def now_text():
    """UTC, to the millisecond: log lines of one second stay in order."""
    seconds = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


def json_line(level, event, message, fields):
    return json.dumps({"time": now_text(), "level": level, "event": event,
                       "fields": {"message": message, **fields}}, default=str)


class EventLog:
    """Writes events to `stream` (stderr), whole lines under a lock: threads share it.
    `stamped`: the text form carries the time (the shipper's lines are events long after
    the start; the server's are not, and keep the form they always had)."""

    def __init__(self, log_format="text", stamped=True, stream=None):
        if log_format not in FORMATS:
            raise ValueError(f"log format {log_format!r}: use text or json")
        self.log_format = log_format
        self.stamped = stamped
        self.stream = stream
        self.lock = threading.Lock()

    def event(self, level, event, message, **fields):
        if self.log_format == "json":
            line = json_line(level, event, message, fields)
        elif self.stamped:
            line = f"chunkvol: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}"
        else:
            line = f"chunkvol: {message}"
        stream = self.stream or sys.stderr  # looked up late: tests and nbdkit swap sys.stderr
        with self.lock:
            stream.write(line + "\n")
            stream.flush()

    def receiver_line(self, line):
        """The log callback of mirror/node_link.py's ReceiverServer: each of its lines is
        about one peer connection that was refused or ended early."""
        self.event("warning", "receiver.connection", line)

    def output_line(self, source, line):
        """A line another program printed (nbdkit itself, a traceback): passed on as it is
        when it is an event already, else wrapped in one."""
        line = line.rstrip("\n")
        if not line:
            return
        if self.log_format == "json":
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and {"time", "level", "event", "fields"} <= parsed.keys():
                text = line
            else:
                level = "error" if "error" in line.lower() or "traceback" in line.lower() else "info"
                text = json_line(level, f"{source}.output", line, {"source": source})
        else:
            text = line
        stream = self.stream or sys.stderr
        with self.lock:
            stream.write(text + "\n")
            stream.flush()
