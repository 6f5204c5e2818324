"""Small server-side SVG charts (no JavaScript, no network): line, stacked bars, bars."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from html import escape

# One colour per failure class, stable across charts.
CLASS_COLORS = {
    "partner_5xx": "#d62728", "timeout": "#ff7f0e", "throttled": "#bcbd22", "dns": "#9467bd",
    "network": "#8c564b", "auth": "#e377c2", "blocked": "#17becf", "config": "#7f7f7f",
}
FALLBACK_COLORS = ("#1f77b4", "#2ca02c", "#aec7e8", "#ffbb78")
PAD_L, PAD_R, PAD_T, PAD_B = 48, 12, 14, 34


def _fmt_pct(v: float) -> str:
    return f"{v * 100:.0f}%"


def color_for(name: str, index: int = 0) -> str:
    return CLASS_COLORS.get(name, FALLBACK_COLORS[index % len(FALLBACK_COLORS)])


def _frame(chart_id: str, title: str, width: int, height: int, body: list[str]) -> str:
    return (
        f'<svg id="{escape(chart_id)}" class="chart" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
        + "".join(body) + "</svg>"
    )


def _x_labels(labels: Sequence[str], x_of: Callable[[int], float], height: int) -> list[str]:
    out = []
    step = max(1, len(labels) // 6)
    for i in range(0, len(labels), step):
        out.append(f'<text x="{x_of(i):.1f}" y="{height - 12}" font-size="10" '
                   f'text-anchor="middle" fill="#555">{escape(labels[i])}</text>')
    return out


def _y_axis(width: int, height: int, top: float, fmt: Callable[[float], str]) -> list[str]:
    out = []
    plot_h = height - PAD_T - PAD_B
    for frac in (0.0, 0.5, 1.0):
        y = PAD_T + plot_h * (1 - frac)
        out.append(f'<line x1="{PAD_L}" x2="{width - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" '
                   'stroke="#e5e5e5"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{y + 3:.1f}" font-size="10" text-anchor="end" '
                   f'fill="#555">{escape(fmt(top * frac))}</text>')
    return out


def line_chart(chart_id: str, title: str, labels: Sequence[str],
               values: Sequence[float | None], *, width: int = 640, height: int = 220,
               top: float = 1.0, fmt: Callable[[float], str] = _fmt_pct,
               color: str = "#2ca02c") -> str:
    """A line over time; None values leave gaps (no data in that bucket)."""
    n = max(1, len(values))
    plot_w = width - PAD_L - PAD_R
    plot_h = height - PAD_T - PAD_B

    def x_of(i: int) -> float:
        return PAD_L + (plot_w * (i + 0.5) / n)

    def y_of(v: float) -> float:
        return PAD_T + plot_h * (1 - (v / top if top else 0))

    body = _y_axis(width, height, top, fmt)
    segment: list[str] = []
    segments: list[list[str]] = []
    for i, v in enumerate(values):
        if v is None:
            if segment:
                segments.append(segment)
            segment = []
            continue
        segment.append(f"{x_of(i):.1f},{y_of(v):.1f}")
        body.append(f'<circle class="point" cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="2.5" '
                    f'fill="{color}"><title>{escape(labels[i])}: {escape(fmt(v))}</title>'
                    "</circle>")
    if segment:
        segments.append(segment)
    for seg in segments:
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                    f'points="{" ".join(seg)}"/>')
    if not segments:
        body.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
                    'fill="#888" font-size="12">no attempts in this range</text>')
    body.extend(_x_labels(labels, x_of, height))
    return _frame(chart_id, title, width, height, body)


def stacked_bars(chart_id: str, title: str, labels: Sequence[str],
                 series: Mapping[str, Sequence[int]], *, width: int = 640,
                 height: int = 220) -> str:
    """Counts per bucket, stacked by series (e.g. failure class), with a legend."""
    n = max(1, len(labels))
    totals = [sum(s[i] for s in series.values()) for i in range(len(labels))]
    top = float(max(totals, default=0) or 1)
    legend_w = 150
    plot_w = width - PAD_L - PAD_R - legend_w
    plot_h = height - PAD_T - PAD_B
    bar_w = max(1.0, plot_w / n * 0.8)

    def x_of(i: int) -> float:
        return PAD_L + plot_w * (i + 0.5) / n

    body = _y_axis(width - legend_w, height, top, lambda v: f"{v:.0f}")
    names = sorted(series, key=lambda k: -sum(series[k]))
    for i in range(len(labels)):
        y = float(PAD_T + plot_h)
        for idx, name in enumerate(names):
            count = series[name][i]
            if not count:
                continue
            h = plot_h * count / top
            y -= h
            body.append(f'<rect class="bar" x="{x_of(i) - bar_w / 2:.1f}" y="{y:.1f}" '
                        f'width="{bar_w:.1f}" height="{h:.1f}" fill="{color_for(name, idx)}">'
                        f"<title>{escape(labels[i])} {escape(name)}: {count}</title></rect>")
    for idx, name in enumerate(names):
        y = PAD_T + 14 * idx
        body.append(f'<rect x="{width - legend_w + 6}" y="{y}" width="10" height="10" '
                    f'fill="{color_for(name, idx)}"/><text x="{width - legend_w + 20}" '
                    f'y="{y + 9}" '
                    f'font-size="11" fill="#333">{escape(name)} ({sum(series[name])})</text>')
    if not names:
        body.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
                    'fill="#888" font-size="12">no failed attempts in this range</text>')
    body.extend(_x_labels(labels, x_of, height))
    return _frame(chart_id, title, width, height, body)


def hbars(chart_id: str, title: str, items: Sequence[tuple[str, float, str]], *,
          top: float | None = None, width: int = 420, color: str = "#d62728",
          text_w: int = 70) -> str:
    """Horizontal bars: (label, value, text shown at the bar's end, in `text_w` pixels)."""
    row_h = 22
    height = max(1, len(items)) * row_h + 10
    top = top or max((v for _, v, _ in items), default=0) or 1.0
    label_w = 130
    plot_w = width - label_w - text_w
    body = []
    for i, (label, value, shown) in enumerate(items):
        y = 5 + i * row_h
        w = plot_w * value / top
        body.append(f'<text x="{label_w - 6}" y="{y + 14}" font-size="11" text-anchor="end" '
                    f'fill="#333">{escape(label[:20])}</text>')
        body.append(f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{w:.1f}" height="14" '
                    f'fill="{color}"><title>{escape(label)}: {escape(shown)}</title></rect>')
        body.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 14}" font-size="11" '
                    f'fill="#333">{escape(shown)}</text>')
    if not items:
        body.append(f'<text x="{width / 2}" y="20" text-anchor="middle" fill="#888" '
                    'font-size="12">nothing to show</text>')
    return _frame(chart_id, title, width, height, body)
