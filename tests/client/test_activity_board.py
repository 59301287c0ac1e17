"""The activity board (client/activity.py) and the gate's loop (client/activity_gate.py).

Real subprocesses for busy_command; the notice's long poll in one trio run;
the gate on trio's virtual clock (its clock is passed in).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC

import pytest
import trio
from fleetpush.client.activity import ActivityBoard, parse_users
from fleetpush.client.activity_gate import ActivityGate
from fleetpush.client.activity_policy import Action, Policy, Verdict
from fleetpush.client.local import ControlError


@pytest.mark.parametrize(
    ("text", "users"),
    [("3\n", 3), (" 0 ", 0), ("", None), ("-1", None), ("2.5", None), ("3 users", None)],
)
def test_parse_users(text: str, users: int | None) -> None:
    assert parse_users(text) == users


CASES = {
    "prints a number": ([sys.executable, "-c", "print(4)"], 4, None),
    "exits non-zero": ([sys.executable, "-c", "print(4); raise SystemExit(2)"], None, "exited"),
    "hangs past busy_timeout": ([sys.executable, "-c", "import time; time.sleep(30)"], None,
                                "no answer within 0.5s"),
    "does not exist": (["/nonexistent/busy"], None, "cannot run it"),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_busy_command(name: str, caplog: pytest.LogCaptureFixture) -> None:
    cmd, users, logged = CASES[name]
    board = ActivityBoard(busy_command=tuple(cmd), busy_timeout=0.5)
    with trio.fail_after(10), caplog.at_level(logging.WARNING, "fleetpush.client.activity"):
        first = await board.refresh()
        again = await board.refresh()
    assert first.users == again.users == users
    assert first.source == "busy_command"
    warnings = [r.getMessage() for r in caplog.records]
    if logged is None:
        assert warnings == []
    else:  # once, not once per reading
        assert len(warnings) == 1 and logged in warnings[0], warnings


async def test_a_report_newer_than_the_command_wins() -> None:
    board = ActivityBoard()
    assert (await board.refresh()).users is None
    board.report(2)
    assert (await board.refresh()).users == 2


async def test_update_pending_is_a_long_poll() -> None:
    board = ActivityBoard()
    with trio.fail_after(5):
        now = await board.on_pending({})
        assert now == {"seq": 0, "pending": None}
        got: list[dict[str, object]] = []

        async def poll() -> None:
            got.append(await board.on_pending({"after": 0, "wait": 4}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await trio.sleep(0.1)
            assert got == []  # still waiting
            board.post_notice({"version": "2.0.0", "starts_at": 1.0, "users": 2})
        assert got == [{"seq": 1, "pending": {"version": "2.0.0", "starts_at": 1.0, "users": 2}}]
        # Nothing new: answered after ``wait`` with what is current.
        assert await board.on_pending({"after": 1, "wait": 0.1}) == got[0]
    for bad in ({"after": "x"}, {"wait": -1}, {"wait": float("nan")}, {"wait": True}):
        with pytest.raises(ControlError):
            await board.on_pending(bad)


async def test_the_gate_follows_the_reports(autojump_clock: trio.abc.Clock) -> None:
    """activity_gate.py on virtual time: 2 users (notified), 5 (the notice is
    withdrawn from its time), 0 (goes at once, the app told it starts now)."""
    board = ActivityBoard()
    reports: list[tuple[float, str]] = []
    told: list[dict[str, object]] = []

    async def report(version: str, push_id: str, reason: str) -> None:
        reports.append((trio.current_time(), reason))

    gate = ActivityGate(
        Policy(notify_wait=60),
        board,
        report=report,
        app_running=lambda: True,
        on_pending=told.append,
        poll=5.0,
        clock=trio.current_time,
        tz=UTC,
    )
    board.report(2)
    verdicts: list[object] = []

    async def waiter() -> None:
        verdicts.append(await gate.wait("2.0.0", forced=False))

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(waiter)
        await trio.sleep(10)
        assert told[0]["starts_at"] == pytest.approx(start + 60)
        assert board.notice is not None and board.notice["users"] == 2
        board.report(5)
        await trio.sleep(1)
        assert board.notice["starts_at"] is None and board.notice["users"] == 5
        await trio.sleep(100)  # far past notify_wait: 5 users still hold it
        assert verdicts == []
        board.report(0)
        went = trio.current_time()
    assert trio.current_time() - went < 0.01, "a report of 0 ends the wait at once"
    (verdict,) = verdicts
    assert isinstance(verdict, Verdict) and verdict.action is Action.GO
    assert told[-1]["starts_at"] == pytest.approx(went, abs=0.01)
    # deferred is reported at each look (the updater sends only what changed).
    reasons = list(dict.fromkeys(r for _, r in reports))
    assert reasons[0].startswith("2 users active (the app is notified, update at")
    assert reasons[1] == "5 users active (waiting for fewer than 3)"


async def test_a_superseded_update_leaves_the_gate(autojump_clock: trio.abc.Clock) -> None:
    board = ActivityBoard()
    board.report(5)
    wanted = True

    async def report(version: str, push_id: str, reason: str) -> None:
        pass

    gate = ActivityGate(
        Policy(), board, report=report, app_running=lambda: True, clock=trio.current_time
    )
    async with trio.open_nursery() as nursery:
        got: list[object] = ["not yet"]

        async def waiter() -> None:
            got[0] = await gate.wait("2.0.0", forced=True, wanted=lambda: wanted)

        nursery.start_soon(waiter)
        await trio.sleep(30)
        assert got == ["not yet"]
        wanted = False
        await trio.sleep(10)  # the next look
    assert got == [None]
