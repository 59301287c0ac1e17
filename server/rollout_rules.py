"""The pure decisions of a deployment (specs/PROTOCOL.md §7.7.1): facts in, a verdict out.

Nothing here reads a clock, the database or the network, so every rule is
tested with plain numbers (tests/server/test_rollout_rules.py), like
``client/trial.py: evaluate(state, now) -> Verdict``. The scheduler
(rollout.py) gathers the facts and acts on the verdicts.

- :func:`phase_sizes`: ``--phases 1%,10%,50%,100%`` (or counts) over N
  targets -> cumulative device counts, the last always N.
- :func:`halt_verdict`: the halt rule (AWS IoT Jobs' abort criteria): once
  at least ``min_executed`` devices have *finished* (succeeded or failed;
  deferred and skipped devices are neither), halt when the failed share
  reaches ``failure_percent``.
- :func:`starts_allowed`: how many devices may be started now
  (``max_concurrent``); :func:`phase_done`: whether the next phase may start.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Final

from attrs import frozen

#: Most phases a deployment may have.
MAX_PHASES: Final = 20

_PHASE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


class PhaseError(ValueError):
    """A ``--phases`` value that names no valid plan (one sentence)."""


def phase_sizes(spec: Sequence[str], targets: int) -> list[int]:
    """Cumulative device counts of each phase over ``targets`` devices.

    Each item is a percentage (``"10%"``: ceil of that share, at least one
    device) or a count (``"50"``: that many in all so far, capped at
    ``targets``). The list must not decrease. A plan that ends before every
    target gets a last phase of 100% (a deployment always covers its
    targets); phases that add no device are dropped. An empty ``spec`` is one
    phase of every target. Raises :class:`PhaseError`.
    """
    if len(spec) > MAX_PHASES:
        raise PhaseError(f"at most {MAX_PHASES} phases, got {len(spec)}")
    sizes: list[int] = []
    for item in spec:
        m = _PHASE.match(item)
        if m is None:
            raise PhaseError(f"phase {item!r} is neither a percentage (10%) nor a count (50)")
        value = float(m.group(1))
        if m.group(2):
            if not 0 < value <= 100:
                raise PhaseError(f"phase {item!r}: a percentage must be in (0, 100]")
            n = max(1, math.ceil(value * targets / 100 - 1e-9))
        else:
            if value != int(value) or value < 1:
                raise PhaseError(f"phase {item!r}: a count must be a whole number of devices")
            n = int(value)
        n = min(n, targets)
        if sizes and n < sizes[-1]:
            raise PhaseError(f"phase {item!r} is smaller than the phase before it")
        sizes.append(n)
    if not sizes or sizes[-1] < targets:
        sizes.append(targets)
    out: list[int] = []
    for n in sizes:
        if n and (not out or n > out[-1]):
            out.append(n)
    return out or [targets]


@frozen(kw_only=True)
class HaltRule:
    """``--halt-after-failures X% --min-executed N``; ``failure_percent`` None: no rule."""

    failure_percent: float | None = None
    min_executed: int = 1


@frozen(kw_only=True)
class Counts:
    """Devices of one deployment that the rule looks at (since the last resume)."""

    succeeded: int = 0
    failed: int = 0

    @property
    def executed(self) -> int:
        return self.succeeded + self.failed


@frozen(kw_only=True)
class Verdict:
    halt: bool
    #: why it halts, one sentence (shown by ``deploy show`` and in the event)
    reason: str = ""


def halt_verdict(rule: HaltRule, counts: Counts) -> Verdict:
    """Halt once ``min_executed`` devices finished and failures reach the percentage.

    "Reach": 1 failure of 20 halts a 5% rule (the operator named the share
    they will not accept). A 0% rule halts at the first failure past
    ``min_executed``; with no rule nothing halts.
    """
    if rule.failure_percent is None or counts.failed == 0:
        return Verdict(halt=False)
    executed = counts.executed
    if executed < max(1, rule.min_executed):
        return Verdict(halt=False)
    # Compare in integers scaled by 100 so 1/20 against 5% is exact.
    if counts.failed * 100 * 1000 < round(rule.failure_percent * 1000) * executed:
        return Verdict(halt=False)
    share = 100 * counts.failed / executed
    return Verdict(
        halt=True,
        reason=(
            f"{counts.failed} of {executed} finished devices failed ({share:.1f}%), "
            f"at or above the {rule.failure_percent:g}% halt threshold"
        ),
    )


def starts_allowed(*, pending: int, in_progress: int, max_concurrent: int) -> int:
    """How many of ``pending`` devices (online, of the open phases) may start now.

    ``in_progress``: started and not finished (deferred ones hold no slot);
    ``max_concurrent`` 0: no limit.
    """
    room = pending
    if max_concurrent > 0:
        room = min(room, max_concurrent - in_progress)
    return max(0, room)


def phase_done(*, open_devices: int, elapsed: float, phase_wait: float | None) -> bool:
    """True when the next phase may start.

    ``open_devices``: devices of this and earlier phases still pending (never
    started: typically offline) or in progress. The phase is done when none
    is left, or once ``phase_wait`` seconds passed since it started (the
    stragglers still join when they connect). Deferred devices do not hold a
    phase: the device itself decided "not now" (§7.6).
    """
    if open_devices == 0:
        return True
    return phase_wait is not None and elapsed >= phase_wait
