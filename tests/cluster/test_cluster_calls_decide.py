"""What a releaser does with a forwarded call's row (server/cluster_calls.py: decide): pure."""

from __future__ import annotations

import attrs
import pytest
from fleetpush.server.cluster_calls import ANSWERED, EXPIRE, IGNORE, RUN, Request, decide

BASE = Request(
    call_id="c1",
    origin="A",
    target="B",
    method="app_control",
    params={"action": "restart", "devices": ["d1"]},
    operator="ops (abcd)",
    created=100.0,
    deadline=110.0,
)

#: prose -> (releaser deciding, its clock, the row's changes, calls running there, decision)
CASES: dict[str, tuple[str, float, dict[str, object], set[str], str]] = {
    "the target runs a pending request in time": ("B", 105.0, {}, set(), RUN),
    "the target skips a pending request past its deadline": ("B", 110.0, {}, set(), EXPIRE),
    "a request already running here is not run twice (a late note, a catch-up)": (
        "B", 105.0, {}, {"c1"}, IGNORE,
    ),
    "a request claimed by the target (running) is left alone": (
        "B", 105.0, {"state": "running"}, set(), IGNORE,
    ),
    "the target ignores its own answer coming back": (
        "B", 105.0, {"state": "done"}, set(), IGNORE,
    ),
    "the origin wakes on a done answer": ("A", 105.0, {"state": "done"}, set(), ANSWERED),
    "the origin wakes on a failed answer": ("A", 105.0, {"state": "failed"}, set(), ANSWERED),
    "the origin wakes on an expired request": ("A", 120.0, {"state": "expired"}, set(), ANSWERED),
    "the origin ignores its own pending request": ("A", 105.0, {}, set(), IGNORE),
    "a third releaser ignores the pair's rows": ("C", 105.0, {"state": "done"}, set(), IGNORE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decide(case: str) -> None:
    me, now, changes, running, expected = CASES[case]
    assert decide(attrs.evolve(BASE, **changes), me, now, running) == expected
