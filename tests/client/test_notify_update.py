"""`fleetpush notify-update` and client/notify.py (issue 11, "The app can see updates").

The decision is a pure table; end to end, the real command talks to a real
control server (client/control.py) on a Unix socket, as an app run by the
agent would, and the once-a-day rule is kept across runs in the state dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from fleetpush.client.control import ControlServer
from fleetpush.client.notify import NOTIFY_INTERVAL, box, notice

FLEETPUSH = str(Path(sys.executable).with_name("fleetpush"))

NEWER = {"version": "1.0.0", "latestVersion": "1.1.0", "updateAvailable": True}
DAY = NOTIFY_INTERVAL

# name -> (status, last notice, now, quiet, the line or None)
SCENARIOS: dict[str, tuple[dict[str, Any], float | None, float, bool, str | None]] = {
    "a newer release, never told: tell": (
        NEWER,
        None,
        1000.0,
        False,
        "Update available: 1.0.0 -> 1.1.0",
    ),
    "told an hour ago: quiet": (NEWER, 1000.0, 1000.0 + 3600, False, None),
    "told a day ago: tell again": (
        NEWER,
        1000.0,
        1000.0 + DAY,
        False,
        "Update available: 1.0.0 -> 1.1.0",
    ),
    "quiet asked: nothing": (NEWER, None, 1000.0, True, None),
    "no update: nothing": ({**NEWER, "updateAvailable": False}, None, 1000.0, False, None),
    "latest is the installed one: nothing, even if flagged": (
        {"version": "1.1.0", "latestVersion": "1.1.0", "updateAvailable": True},
        None,
        1000.0,
        False,
        None,
    ),
    "never checked (latestVersion null): nothing": (
        {"version": "1.0.0", "latestVersion": None, "updateAvailable": False},
        None,
        1000.0,
        False,
        None,
    ),
    "a clock that went back: tell": (
        NEWER,
        5000.0,
        1000.0,
        False,
        "Update available: 1.0.0 -> 1.1.0",
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_notice(name: str) -> None:
    status, last, now, quiet, line = SCENARIOS[name]
    assert notice(status, last, now, quiet=quiet) == line


def test_box_frames_the_line() -> None:
    lines = box("Update available: 1.0.0 -> 1.1.0").splitlines()
    assert lines[1] == "│ Update available: 1.0.0 -> 1.1.0 │"
    assert len({len(line) for line in lines}) == 1


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEETPUSH, "notify-update", *args], capture_output=True, text=True, env=env, timeout=30
    )


async def test_the_command_tells_once_a_day_through_the_control_socket(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    asked: list[str] = []

    async def status(_args: dict[str, Any]) -> dict[str, Any]:
        asked.append("status")
        return dict(NEWER)

    server = ControlServer(state / "control.sock", {"status": status}, lambda e: 1)
    env = {**os.environ, "FLEETPUSH_CONTROL_SOCKET": str(state / "control.sock")}
    env.pop("FLEETPUSH_NO_UPDATE_NOTIFY", None)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            assert await nursery.start(server.serve) is not None
            first = await trio.to_thread.run_sync(lambda: _run(env=env))
            again = await trio.to_thread.run_sync(lambda: _run(env=env))
            quiet = await trio.to_thread.run_sync(
                lambda: _run(env={**env, "FLEETPUSH_NO_UPDATE_NOTIFY": "1"})
            )
            nursery.cancel_scope.cancel()
    assert first.returncode == 0 and first.stdout == ""
    assert "Update available: 1.0.0 -> 1.1.0" in first.stderr
    assert again.returncode == 0 and again.stderr == ""  # once per 24 h
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert asked == ["status", "status"]  # silenced: the owner is not even asked
    assert (state / "notify-update.json").stat().st_mode & 0o777 == 0o600


def test_no_agent_is_one_line_and_exit_3(tmp_path: Path) -> None:
    env = {**os.environ, "FLEETPUSH_CONTROL_SOCKET": str(tmp_path / "control.sock")}
    done = _run(env=env)
    assert done.returncode == 3
    assert done.stderr.startswith("fleetpush: notify-update: nothing answers on ")
    assert len(done.stderr.splitlines()) == 1
    assert _run("--quiet", env=env).stderr == ""
