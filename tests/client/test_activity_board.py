"""The activity board (client/activity.py): busy_command readings and the pending notice.

Real subprocesses for busy_command; the notice's long poll in one trio run.
"""

from __future__ import annotations

import logging
import sys

import pytest
import trio
from fleetpush.client.activity import ActivityBoard, parse_users
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
