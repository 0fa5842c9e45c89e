"""Watching a running server: Prometheus metrics, the status page, structured logs.

`chunkvol serve` runs three processes: itself (a supervisor that forwards signals and
restarts the shipper), nbdkit with the plugin (it holds the pool open: every NBD request,
the control socket, `--listen`'s receiver) and the shipper (`mirror run --via-server`, one
thread per mirror or peer). The counts live where the work is done, so the HTTP listener
(`serve --http`) runs inside nbdkit's process, beside the control socket:

- counters.py: per-request counts the plugin keeps in plain integers (no lock, no call);
- errors.py: what failed, by kind; the shipper's counts reach the server through a file in
  the runtime directory (control.py's), which it rewrites on each failure;
- figures.py: the pool's figures (volumes, chunks, mirror and peer lag), read-only;
- sampler.py: lag sampled every few seconds into a bounded ring, for the page's charts;
- metrics.py: a prometheus_client collector that turns all of it into metric families at
  scrape time; charts.py and page.py: the status page; web.py: the HTTP server (GET only);
- log.py: every line the server and the shipper print, as text or as one JSON object.
"""
