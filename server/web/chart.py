"""Devices by version over time: samples kept in memory, drawn as an SVG line chart.

The fleet page's chart (issue 16: "versions over time"). The releaser stores
no such series, so the dashboard samples the counts ``status`` gives every
:data:`INTERVAL` seconds and keeps the last :data:`KEEP` samples (a day at
one a minute); the chart starts again when the releaser restarts. Drawing is
a pure function of the samples: inline SVG with presentation attributes,
which the page's Content-Security-Policy allows (no style, no script).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from .http import esc

INTERVAL: Final = 60.0
KEEP: Final = 1440
#: Versions drawn at most (the largest now); the rest are summed as "other".
LINES: Final = 6
COLOURS: Final = ("#2457c5", "#1e7b34", "#b3261e", "#8a5a00", "#6b3fa0", "#00707a", "#667")

Sample = tuple[float, dict[str, int]]


class VersionHistory:
    """The last :data:`KEEP` samples of devices by version (trio thread only)."""

    def __init__(self, keep: int = KEEP) -> None:
        self.samples: collections.deque[Sample] = collections.deque(maxlen=keep)

    def add(self, now: float, counts: dict[str, int]) -> None:
        self.samples.append((now, dict(counts)))

    async def run(
        self, counts: Callable[[], Awaitable[dict[str, int]]], interval: float = INTERVAL
    ) -> None:
        """Sample ``counts()`` now and every ``interval`` seconds, until cancelled."""
        while True:
            self.add(time.time(), await counts())
            await trio.sleep(interval)


def svg(samples: list[Sample], *, width: int = 560, height: int = 160) -> str:
    """A line per version (the :data:`LINES` largest now), time along x, devices up y."""
    if not samples:
        return '<p class="hint">no samples yet</p>'
    latest = samples[-1][1]
    top = sorted(latest, key=lambda v: -latest[v])[:LINES]
    series: dict[str, list[int]] = {v: [] for v in top}
    other: list[int] = []
    for _, counts in samples:
        for v in top:
            series[v].append(counts.get(v, 0))
        other.append(sum(n for v, n in counts.items() if v not in series))
    if any(other):
        series["other"] = other
    peak = max((max(vals) for vals in series.values()), default=0) or 1
    t0, t1 = samples[0][0], samples[-1][0]
    span = (t1 - t0) or 1.0
    pad, legend = 30, 100  # the legend sits right of the plot

    def x(t: float) -> float:
        return pad + (width - pad - legend) * (t - t0) / span

    def y(n: int) -> float:
        return height - pad + (2 * pad - height) * n / peak

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="devices by version over time">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - legend}" y2="{height - pad}" '
        'stroke="#bbc"/>',
        f'<text x="2" y="{pad}" font-size="11" fill="#667">{peak}</text>',
        f'<text x="2" y="{height - pad}" font-size="11" fill="#667">0</text>',
        f'<text x="{pad}" y="{height - 8}" font-size="11" fill="#667">'
        f'{time.strftime("%H:%M", time.gmtime(t0))}</text>',
        f'<text x="{width - legend}" y="{height - 8}" font-size="11" fill="#667" '
        f'text-anchor="end">{time.strftime("%H:%M UTC", time.gmtime(t1))}</text>',
    ]
    for i, (version, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(
            f"{x(t):.1f},{y(n):.1f}" for (t, _), n in zip(samples, values, strict=True)
        )
        if len(samples) == 1:
            parts.append(f'<circle cx="{x(t0):.1f}" cy="{y(values[0]):.1f}" r="3" '
                         f'fill="{colour}"/>')
        else:
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                         'stroke-width="2"/>')
        parts.append(f'<text x="{width - legend + 8}" y="{14 + 14 * i}" font-size="11" '
                     f'fill="{colour}">{esc(version)}</text>')
    parts.append("</svg>")
    return "".join(parts)
