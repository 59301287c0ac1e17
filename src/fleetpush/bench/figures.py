"""Figures measured in interleaved rounds, and ratios between them taken round by round.

A ratio is only honest between two figures measured in the same round: on a
shared VM the machine's state (page cache, free-page reporting, neighbours)
drifts between rounds, so dividing one round's download by another round's
baseline measures the drift. :meth:`Figures.ratio` pairs the two figures
round by round and reports the median of those per-round ratios, with their
min and max; :meth:`Figures.document` turns everything into plain JSON.
"""

from __future__ import annotations

import statistics
from typing import Any

import attrs


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


@attrs.define
class Figures:
    """Per-round values by name; ``round`` is the index of the round being measured."""

    round: int = 0
    #: name -> {round: value}
    values: dict[str, dict[int, float]] = attrs.field(factory=dict)
    #: ratio name -> (of, to, invert): of/to per round, or to/of for durations
    ratios: dict[str, tuple[str, str, bool]] = attrs.field(factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, {})[self.round] = float(value)

    def has(self, name: str) -> bool:
        return bool(self.values.get(name))

    def last(self, name: str) -> float:
        """This round's value of ``name`` (0 if not measured)."""
        return self.values.get(name, {}).get(self.round, 0.0)

    def ratio(self, name: str, of: str, to: str, *, durations: bool = False) -> None:
        """Declare ``name`` = of / to (rates), or to / of with ``durations`` (a speed-up)."""
        self.ratios[name] = (of, to, durations)

    def per_round(self, name: str) -> list[float]:
        of, to, durations = self.ratios[name]
        a, b = self.values.get(of, {}), self.values.get(to, {})
        out = []
        for r in sorted(set(a) & set(b)):
            num, den = (b[r], a[r]) if durations else (a[r], b[r])
            if den > 0:
                out.append(num / den)
        return out

    def document(self) -> dict[str, Any]:
        """``{name: median}`` for every figure, plus ``runs``, ``ranges``, ``ratios``
        (medians of the per-round ratios) and ``ratio_ranges`` (how each was made)."""
        doc: dict[str, Any] = {}
        runs: dict[str, list[float]] = {}
        ranges: dict[str, list[float]] = {}
        for name, by_round in sorted(self.values.items()):
            vals = [by_round[r] for r in sorted(by_round)]
            doc[name] = _round(median(vals))
            runs[name] = [_round(v) for v in vals]
            ranges[name] = [_round(min(vals)), _round(max(vals))]
        ratios: dict[str, float] = {}
        ratio_ranges: dict[str, dict[str, Any]] = {}
        for name, (of, to, durations) in sorted(self.ratios.items()):
            vals = self.per_round(name)
            if not vals:
                continue
            ratios[name] = _round(median(vals))
            ratio_ranges[name] = {
                "of": of,
                "to": to,
                "durations": durations,
                "min": _round(min(vals)),
                "max": _round(max(vals)),
                "runs": [_round(v) for v in vals],
            }
        doc.update(runs=runs, ranges=ranges, ratios=ratios, ratio_ranges=ratio_ranges)
        return doc


def _round(v: float) -> float:
    """Plain numbers in the JSON: counts (bytes on the wire, peak RSS) exactly, as
    integers; measured rates and times to 6 significant digits, more than any
    bench resolves."""
    if v.is_integer():
        return int(v)
    return float(f"{v:.6g}")
