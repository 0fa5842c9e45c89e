"""The status page: one self-contained HTML document (its style inline, its charts inline
SVG from charts.py, no script), drawn from the same figures as /metrics."""

import time

from chunkvol.cli.sizes import format_size
from chunkvol.errors import ChunkvolError
from chunkvol.monitor.charts import chunk_map, escape, line_chart, timeline

STYLE = """
body { font: 14px/1.4 sans-serif; margin: 1.5em; color: #111; background: #fafafa; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; }
td:first-child, th:first-child { text-align: left; }
svg.chart { background: #fff; border: 1px solid #ddd; margin: 4px 0; display: block; }
svg .title { font-size: 12px; font-weight: bold; } svg .axis, svg .label { font-size: 10px; fill: #555; }
svg .plot { fill: #f4f6fb; stroke: #ccd; }
.note { color: #555; } .error { color: #b91c1c; }
"""
LAG_KINDS = {"mirror": "mirror", "peer-out": "peer (to it)", "peer-in": "peer (from it)"}


def render(figures, sampler):
    report = figures.pool_report()
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>chunkvol {escape(report['pool'])}</title>", f"<style>{STYLE}</style></head><body>",
             f"<h1>chunkvol pool {escape(report['pool'])}</h1>",
             f'<p class="note">node {escape(report["node_id"])}, chunks of {escape(format_size(report["chunk_size"]))}'
             f', page drawn {escape(report["time"])}</p>']
    parts += _volumes(report)
    parts += _mirrors(figures, sampler)
    parts += _chunks(report)
    parts.append("</body></html>")
    return "\n".join(parts)


def _volumes(report):
    parts = ["<h2>Volumes</h2>", '<table class="volumes"><tr><th>volume</th><th>size</th><th>mapped</th>'
             "<th>stored</th><th>history</th><th>snapshots</th><th>conflicts</th></tr>"]
    for name, volume in report["volumes"].items():
        parts.append(f"<tr><td>{escape(name)}</td><td>{escape(format_size(volume['size']))}</td>"
                     f"<td>{escape(format_size(volume['mapped_bytes']))}</td>"
                     f"<td>{escape(format_size(volume['stored_bytes']))}</td>"
                     f"<td>{escape(format_size(volume['history_bytes']))}</td>"
                     f"<td>{volume['snapshots']}</td><td>{volume['conflicts']}</td></tr>")
    parts.append("</table>")
    for name, volume in report["volumes"].items():
        parts.append(f"<h3>{escape(name)}: flush points and snapshots</h3>")
        parts.append(timeline(name, volume["flush_points"], volume["snapshot_list"]))
    return parts


def _mirrors(figures, sampler):
    parts = ["<h2>Mirrors and peers</h2>"]
    try:
        rows = figures.mirror_rows()
    except (ChunkvolError, OSError) as error:
        return parts + [f'<p class="error">cannot read the mirrors: {escape(error)}</p>']
    if not rows:
        return parts + ['<p class="note">no mirrors or peers (`chunkvol mirror add`, `chunkvol peer add`)</p>']
    parts.append('<table class="mirrors"><tr><th>name</th><th>to</th><th>state</th><th>behind</th>'
                 "<th>seconds behind</th><th>shipped</th><th>last error</th></tr>")
    for row in rows:
        kind = "peer" if row["peer"] else "mirror"
        parts.append(f"<tr><td>{escape(row['name'])} ({kind})</td><td>{escape(row['to'])}</td>"
                     f"<td>{escape(row['state'])}</td><td>{escape(format_size(row['bytes_behind']))}</td>"
                     f"<td>{row['seconds_behind']:.1f}</td><td>{escape(format_size(row['shipped_bytes']))}</td>"
                     f"<td>{escape(row['last_error'] or '')}</td></tr>")
    parts.append("</table>")
    samples = sampler.samples()
    now = time.time()
    start = now - sampler.ring.maxlen * sampler.sample_seconds
    series = {}
    for sample in samples:
        for key, (behind, _) in sample.lags.items():
            series.setdefault(key, []).append((sample.time, behind))
    for row in rows:  # each line ends at what the table above says now
        series.setdefault(("peer-out" if row["peer"] else "mirror", row["name"]), []).append((now, row["bytes_behind"]))
    for (kind, name), points in sorted(series.items()):
        parts.append(line_chart(f"{name}, {LAG_KINDS[kind]}: bytes behind, last hour", points, start, now))
    if sampler.last_error:
        parts.append(f'<p class="error">lag sampling failed: {escape(sampler.last_error)}</p>')
    return parts


def _chunks(report):
    open_chunk = report["log"]["chunk"]
    reclaimable = sum(chunk["written"] - chunk["live_bytes"] for chunk in report["chunks"])
    return ["<h2>Chunks</h2>",
            f'<p class="note">{len(report["chunks"])} chunks; colour: the share of each chunk\'s written bytes '
            f"that is live (red: none, green: all); crossed: evicted to an object store; outlined: open. "
            f"Not live: {escape(format_size(reclaimable))} (history and garbage; `chunkvol compact` frees "
            "what no snapshot or retention keeps).</p>",
            chunk_map(report["chunks"], open_chunk)]
