"""The pure decisions of a deployment (server/rollout_rules.py): numbers in, verdicts out."""

from __future__ import annotations

import pytest
from fleetpush.server.rollout_rules import (
    Counts,
    HaltRule,
    PhaseError,
    halt_verdict,
    phase_done,
    phase_sizes,
    starts_allowed,
)

PHASES = {
    "percentages over 1000": (["1%", "10%", "50%", "100%"], 1000, [10, 100, 500, 1000]),
    "a small percentage is at least one device": (["1%", "100%"], 5, [1, 5]),
    "percentages round up": (["10%"], 15, [2, 15]),
    "counts, and a last phase of 100% is added": (["5", "50"], 200, [5, 50, 200]),
    "counts past the targets are capped, repeats dropped": (["5", "50", "100%"], 20, [5, 20]),
    "no phases: one phase of everyone": ([], 7, [7]),
    "mixed counts and percentages": (["2", "50%"], 10, [2, 5, 10]),
}


@pytest.mark.parametrize("spec,targets,sizes", PHASES.values(), ids=PHASES.keys())
def test_phase_sizes(spec: list[str], targets: int, sizes: list[int]) -> None:
    assert phase_sizes(spec, targets) == sizes


BAD_PHASES = {
    "not a number": ["ten"],
    "zero percent": ["0%"],
    "over 100 percent": ["150%"],
    "a fractional count": ["2.5"],
    "a zero count": ["0"],
    "decreasing": ["50%", "10%"],
    "too many": ["1"] * 21,
}


@pytest.mark.parametrize("spec", BAD_PHASES.values(), ids=BAD_PHASES.keys())
def test_bad_phases_are_one_sentence(spec: list[str]) -> None:
    with pytest.raises(PhaseError) as e:
        phase_sizes(spec, 100)
    assert "\n" not in str(e.value) and str(e.value)


RULE = HaltRule(failure_percent=5.0, min_executed=20)

VERDICTS = {
    "no rule never halts": (HaltRule(), Counts(succeeded=0, failed=50), False),
    "below min_executed does not halt, however bad": (RULE, Counts(succeeded=0, failed=19), False),
    "1 of 20 reaches 5%: halt": (RULE, Counts(succeeded=19, failed=1), True),
    "1 of 21 is under 5%": (RULE, Counts(succeeded=20, failed=1), False),
    "no failure never halts": (RULE, Counts(succeeded=1000, failed=0), False),
    "30% of 20 halts": (RULE, Counts(succeeded=14, failed=6), True),
    "0% halts at the first failure past min_executed": (
        HaltRule(failure_percent=0, min_executed=3),
        Counts(succeeded=2, failed=1),
        True,
    ),
    "100% halts only when every finished device failed": (
        HaltRule(failure_percent=100, min_executed=2),
        Counts(succeeded=1, failed=9),
        False,
    ),
    "a fractional threshold is exact": (
        HaltRule(failure_percent=12.5, min_executed=8),
        Counts(succeeded=7, failed=1),
        True,
    ),
}


@pytest.mark.parametrize("rule,counts,halt", VERDICTS.values(), ids=VERDICTS.keys())
def test_halt_verdict(rule: HaltRule, counts: Counts, halt: bool) -> None:
    verdict = halt_verdict(rule, counts)
    assert verdict.halt is halt
    if halt:
        assert f"{counts.failed} of {counts.executed}" in verdict.reason


def test_halt_verdict_is_monotonic_in_failures() -> None:
    # Once it halts for (s, f), it halts for (s, f + 1): more failures never un-halt.
    for s in range(0, 60):
        for f in range(0, 60):
            if halt_verdict(RULE, Counts(succeeded=s, failed=f)).halt:
                assert halt_verdict(RULE, Counts(succeeded=s, failed=f + 1)).halt, (s, f)


STARTS = {
    "no limit starts every pending device": (dict(pending=7, in_progress=3, max_concurrent=0), 7),
    "the limit counts what is in progress": (dict(pending=7, in_progress=3, max_concurrent=5), 2),
    "a full limit starts nothing": (dict(pending=7, in_progress=5, max_concurrent=5), 0),
    "nothing pending starts nothing": (dict(pending=0, in_progress=0, max_concurrent=5), 0),
}


@pytest.mark.parametrize("kw,n", STARTS.values(), ids=STARTS.keys())
def test_starts_allowed(kw: dict[str, int], n: int) -> None:
    assert starts_allowed(**kw) == n


def test_phase_done() -> None:
    assert phase_done(open_devices=0, elapsed=0, phase_wait=None)
    assert not phase_done(open_devices=1, elapsed=1e9, phase_wait=None)
    assert not phase_done(open_devices=1, elapsed=9.9, phase_wait=10)
    assert phase_done(open_devices=1, elapsed=10, phase_wait=10)
