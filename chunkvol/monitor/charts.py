"""The status page's pictures, as inline SVG strings drawn here (no script, no font from the
network). Every name that reaches the markup goes through `escape`."""

import html

from chunkvol.cli.sizes import format_size

CELL = 22  # pixels per chunk in the chunk map
CELLS_PER_ROW = 32


def escape(text):
    """For text and attribute values alike, in HTML and in SVG."""
    return html.escape(str(text), quote=True)


def live_colour(fraction):
    """Red (all dead: compaction frees it) through amber to green (all live)."""
    fraction = min(1.0, max(0.0, fraction))
    red = int(220 - 170 * fraction)
    green = int(60 + 130 * fraction)
    return f"rgb({red},{green},70)"


def line_chart(title, points, start, end, width=560, height=150):
    """A line of (unix time, value) over [start, end]: lag over the last hour. The value axis
    runs from 0 to the largest value (bytes), labelled at the top."""
    left, right, top, bottom = 70, 10, 22, 24
    plot_width, plot_height = width - left - right, height - top - bottom
    peak = max([value for _, value in points] + [1])
    span = max(end - start, 1e-9)

    def x(when):
        return left + (when - start) / span * plot_width

    def y(value):
        return top + plot_height - value / peak * plot_height

    parts = [f'<svg class="chart lag-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="14" class="title">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_width}" height="{plot_height}" class="plot"/>',
             f'<text x="{left - 4}" y="{top + 10}" text-anchor="end" class="axis">{escape(format_size(peak))}</text>',
             f'<text x="{left - 4}" y="{top + plot_height}" text-anchor="end" class="axis">0</text>',
             f'<text x="{left}" y="{height - 6}" class="axis">-{(end - start) / 60:.0f} min</text>',
             f'<text x="{left + plot_width}" y="{height - 6}" text-anchor="end" class="axis">now</text>']
    if points:
        coordinates = " ".join(f"{x(when):.1f},{y(value):.1f}" for when, value in points)
        parts.append(f'<polyline class="lag-line" points="{coordinates}" fill="none" stroke="#2563eb" '
                     'stroke-width="2"/>')
        last_when, last_value = points[-1]
        parts.append(f'<circle class="lag-now" cx="{x(last_when):.1f}" cy="{y(last_value):.1f}" r="3" '
                     'fill="#2563eb"/>')
    parts.append("</svg>")
    return "".join(parts)


def timeline(volume, flush_points, snapshots, width=560, height=70):
    """A volume's history: a tick per flush point, a flag per snapshot, oldest on the left."""
    left, right = 10, 10
    stamps = [row["stamp"] for row in flush_points] + [snapshot["stamp"] for snapshot in snapshots]
    parts = [f'<svg class="chart timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="history of {escape(volume)}">',
             f'<line x1="{left}" y1="40" x2="{width - right}" y2="40" stroke="#888"/>']
    if stamps:
        first, last = min(stamps) >> 16, max(stamps) >> 16  # wall-clock milliseconds of the HLC stamps
        span = max(last - first, 1)

        def x(stamp):
            return left + ((stamp >> 16) - first) / span * (width - left - right)

        for row in flush_points:
            parts.append(f'<line class="flush-point" x1="{x(row["stamp"]):.1f}" y1="33" x2="{x(row["stamp"]):.1f}" '
                         f'y2="47" stroke="#2563eb"><title>{escape(row["time"])}</title></line>')
        for snapshot in snapshots:
            at = x(snapshot["stamp"])
            # the name right of its flag, or left of it in the right half (else it runs off the edge)
            label = (f'x="{at + 3:.1f}"' if at < width / 2 else f'x="{at - 3:.1f}" text-anchor="end"')
            parts.append(f'<g class="snapshot"><line x1="{at:.1f}" y1="12" x2="{at:.1f}" y2="47" stroke="#d97706" '
                         f'stroke-width="2"/><text {label} y="20" class="label">@{escape(snapshot["name"])}'
                         f'</text><title>{escape(snapshot["name"])} {escape(snapshot["time"])}</title></g>')
        parts.append(f'<text x="{left}" y="64" class="axis">{escape(flush_points[0]["time"] if flush_points else "")}'
                     f'</text>')
    else:
        parts.append(f'<text x="{left}" y="30" class="axis">no flush points yet</text>')
    parts.append("</svg>")
    return "".join(parts)


def chunk_map(chunks, open_chunk):
    """One cell per chunk, coloured by the fraction of its written bytes still live (what
    `compact` keeps); evicted chunks crossed and outlined, the open chunk outlined."""
    rows = max(1, -(-len(chunks) // CELLS_PER_ROW))
    width = CELLS_PER_ROW * CELL + 2
    parts = [f'<svg class="chart chunk-map" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{rows * CELL + 2}" role="img" aria-label="chunk map">']
    for index, chunk in enumerate(chunks):
        x, y = 1 + index % CELLS_PER_ROW * CELL, 1 + index // CELLS_PER_ROW * CELL
        fraction = chunk["live_bytes"] / chunk["written"] if chunk["written"] else 1.0
        evicted = bool(chunk["evicted_to"])
        classes = "chunk evicted" if evicted else "chunk"
        stroke = "#111" if evicted or chunk["id"] == open_chunk else "#fff"
        tip = (f"chunk {chunk['id']}: {format_size(chunk['live_bytes'])} live of {format_size(chunk['written'])} "
               f"written ({fraction:.0%})" + (f", evicted to {chunk['evicted_to']}" if evicted else "")
               + (", open" if chunk["id"] == open_chunk else ""))
        parts.append(f'<g class="{classes}" data-chunk="{chunk["id"]}" data-live="{fraction:.3f}">'
                     f'<rect x="{x}" y="{y}" width="{CELL - 2}" height="{CELL - 2}" fill="{live_colour(fraction)}" '
                     f'stroke="{stroke}" stroke-width="2"/>')
        if evicted:
            parts.append(f'<line x1="{x + 3}" y1="{y + 3}" x2="{x + CELL - 5}" y2="{y + CELL - 5}" stroke="#111" '
                         'stroke-width="2"/>')
        parts.append(f"<title>{escape(tip)}</title></g>")
    parts.append("</svg>")
    return "".join(parts)
