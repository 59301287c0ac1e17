"""The activity gate end to end (issue 12, part 3): a real releaser on 127.0.0.1,
a real ``fleetpush agent`` process, and an app that reports its users over the
control socket (``local.report_activity``) and listens for the pending-update
notice (``local.on_update_pending``).

The app's user count is a file the test writes; the app reports it every
0.1 s. The app appends ``VERSION PID TIME`` to ``started`` at each start and
each notice it receives, as a JSON line with the time it arrived, to
``notices``. Waits are made short through agent.toml (sub-second polls, a few
seconds of notify_wait, force_deadline or window), never by patching code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from fleetpush.client.activity_policy import Window
from fleetpush.protocol.keys import private_key_to_pem
from fleetpush.protocol.messages import DeviceInfo
from fleetpush.server import ServerHandle
from fp_agent import FLEETPUSH, AgentDevice
from fp_keys import OPERATOR_KEY
from fp_releaser import publish_and_approve, push, releaser
from fp_trees import app_release

from fleetpush.cli import output
from fleetpush.operator import connect

#: The supervised app: reports the users the test sets; records starts and notices.
ACTIVITY_APP = """
import json, os, signal, sys, time
from pathlib import Path
from fleetpush.client import local

app_root, box = Path(sys.argv[1]), Path(sys.argv[2])
version = (app_root / "version.txt").read_text().strip()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

def noticed(pending):
    with open(box / "notices", "a") as f:
        f.write(json.dumps({**pending, "received": time.time(), "by": version}) + "\\n")

with open(box / "started", "a") as f:
    f.write(f"{version} {os.getpid()} {time.time()}\\n")
local.on_update_pending(noticed, retry=0.1)
while True:
    try:
        users = int((box / "users").read_text())
        local.report_activity(users=users)
    except (OSError, ValueError, local.ControlError):
        pass
    time.sleep(0.1)
"""

#: Short waits for the tests; the gate re-reads the activity every 0.2 s.
GATE: dict[str, object] = dict(activity_poll=0.2, activity_max_age=30, stop_timeout=3)


class GateDevice(AgentDevice):
    """dev-1 under a real agent, running :data:`ACTIVITY_APP`."""

    def __init__(self, tmp_path: Path, port: int, users: int, **settings: object) -> None:
        super().__init__(tmp_path, port, **{**GATE, **settings})
        self.box = tmp_path / "box"
        self.box.mkdir()
        self.script = tmp_path / "activity_app.py"
        self.script.write_text(ACTIVITY_APP)
        self.set_users(users)

    def app_command(self) -> list[str]:
        return [sys.executable, str(self.script), str(self.app_root), str(self.box)]

    def set_users(self, n: int) -> None:
        tmp = self.box / "users.tmp"
        tmp.write_text(str(n))
        tmp.replace(self.box / "users")

    def starts(self) -> list[tuple[str, float]]:
        """(version, time) of each start of the app."""
        path = self.box / "started"
        lines = path.read_text().split("\n") if path.exists() else []
        return [(v, float(t)) for v, _pid, t in (line.split() for line in lines if line)]

    def notices(self) -> list[dict[str, Any]]:
        path = self.box / "notices"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    async def wait_started(self, version: str, timeout: float = 30.0) -> float:
        with trio.fail_after(timeout):
            while True:
                for v, t in self.starts():
                    if v == version:
                        return t
                await trio.sleep(0.05)

    async def wait_reported(self, users: int) -> None:
        """Until the agent's status shows the app's report of ``users``."""
        from fleetpush.client import local

        with trio.fail_after(20):
            while True:
                try:
                    doc = await trio.to_thread.run_sync(
                        lambda: local.status(state_dir=self.state_dir)
                    )
                    if (doc.get("activity") or {}).get("users") == users:
                        return
                except local.ControlError:
                    pass
                await trio.sleep(0.1)


async def _info(handle: ServerHandle) -> DeviceInfo:
    async with connect(("127.0.0.1", handle.port), OPERATOR_KEY, name="ops") as op:
        (info,) = await op.list_devices(app="demo")
    return info


async def _wait_deferred(handle: ServerHandle, words: str) -> DeviceInfo:
    """The releaser's listing once dev-1 is deferred for a reason holding ``words``."""
    seen: list[tuple[str, str | None]] = []
    with trio.move_on_after(20):
        while True:
            info = await _info(handle)
            if info.state == "deferred" and words in (info.state_error or ""):
                return info
            if (info.state, info.state_error) not in seen:
                seen.append((info.state, info.state_error))
            await trio.sleep(0.1)
    raise AssertionError(f"never deferred for {words!r}; the releaser listed {seen}")


async def _devices_text(tmp_path: Path, handle: ServerHandle) -> str:
    """``fleetpush devices`` through the installed script: what the operator reads."""
    key = tmp_path / "operator.key"
    key.write_bytes(private_key_to_pem(OPERATOR_KEY))
    server = f"127.0.0.1:{handle.port}"
    done = await trio.run_process(
        [FLEETPUSH, "devices", "--insecure", "--server", server, "--operator-key", str(key)],
        capture_stdout=True,
        capture_stderr=True,
        env={**os.environ, "COLUMNS": "400"},
        cwd=str(tmp_path),
    )
    return str(done.stdout.decode())


async def _events_text(handle: ServerHandle) -> list[str]:
    """The event log's lines as ``watch`` prints them (the history, then 1 s of live)."""
    lines = []
    async with connect(("127.0.0.1", handle.port), OPERATOR_KEY, name="ops") as op:
        with trio.move_on_after(1.0):
            async for e in op.watch(history=200):
                lines.append(output.describe_event(e))
    return lines


@pytest.fixture
def agent_log(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    log = tmp_path / "device" / "agent.log"
    if log.exists():
        print(log.read_text()[-8000:])


async def _with_v2(tmp_path: Path, handle: ServerHandle) -> None:
    v2 = app_release(tmp_path, "plain_app", "2.0.0")
    await publish_and_approve(handle, tmp_path / "data", v2, "2.0.0")


async def test_no_users_applies_at_once(tmp_path: Path, agent_log: None) -> None:
    with trio.fail_after(90):
        async with releaser(tmp_path / "data") as handle:
            await _with_v2(tmp_path, handle)
            # notify_wait and force_deadline long: any wait at the gate would show.
            dev = GateDevice(tmp_path, handle.port, 0, notify_wait=30, force_deadline=60)
            await dev.start_agent()
            try:
                await dev.wait_started("1.0.0")
                await dev.wait_reported(0)
                pushed = time.time()
                await push(handle, "2.0.0")
                started = await dev.wait_started("2.0.0")
                assert started - pushed < 15, "0 users: nothing to wait for"
                assert dev.notices() == [], "0 users: the app is not bothered"
                await dev.wait_state(lambda s: s.installed_version == "2.0.0")
            finally:
                await dev.stop_agents()


async def test_two_users_are_notified_then_the_update_goes(
    tmp_path: Path, agent_log: None
) -> None:
    with trio.fail_after(90):
        async with releaser(tmp_path / "data") as handle:
            await _with_v2(tmp_path, handle)
            dev = GateDevice(tmp_path, handle.port, 2, notify_wait=3, force_deadline=60)
            await dev.start_agent()
            try:
                await dev.wait_started("1.0.0")
                await dev.wait_reported(2)
                pushed = time.time()
                await push(handle, "2.0.0")
                info = await _wait_deferred(handle, "2 users active (the app is notified")
                assert info.version == "1.0.0"
                started = await dev.wait_started("2.0.0")
                notice = dev.notices()[0]
                # The app (still 1.0.0) heard of 2.0.0 before it was stopped,
                # with the time the update would start: notify_wait after the notice.
                assert notice["by"] == "1.0.0" and notice["version"] == "2.0.0"
                assert notice["users"] == 2
                assert notice["received"] < started
                assert notice["starts_at"] == pytest.approx(notice["received"] + 3, abs=1.0)
                assert started >= notice["starts_at"] - 0.2, "went before notify_wait"
                assert started - pushed < 20
            finally:
                await dev.stop_agents()


def _window_from(start: datetime, hours: float = 1) -> str:
    """``HH:MM:SS-HH:MM:SS`` local time, opening at ``start``."""
    end = start + timedelta(hours=hours)
    return f"{start:%H:%M:%S}-{end:%H:%M:%S}"


async def test_five_users_defer_until_they_leave(tmp_path: Path, agent_log: None) -> None:
    with trio.fail_after(120):
        async with releaser(tmp_path / "data") as handle:
            await _with_v2(tmp_path, handle)
            window = _window_from(datetime.now() + timedelta(hours=2))
            dev = GateDevice(
                tmp_path,
                handle.port,
                5,
                notify_wait=30,
                force_deadline=600,
                maintenance_window=window,
            )
            await dev.start_agent()
            try:
                await dev.wait_started("1.0.0")
                await dev.wait_reported(5)
                await push(handle, "2.0.0")
                reason = f"5 users active (waiting for window {window}"
                info = await _wait_deferred(handle, reason)
                assert info.version == "1.0.0"
                # What the operator reads: the reason with the state, in the
                # devices listing and in the event log (watch prints the same lines).
                listing = await _devices_text(tmp_path, handle)
                (row,) = [line for line in listing.splitlines() if line.startswith("dev-1")]
                assert " deferred " in row and f"  {reason}" in row, listing
                assert any(f"why: {reason}" in line for line in await _events_text(handle))
                await trio.sleep(1.0)
                assert [v for v, _ in dev.starts()] == ["1.0.0"], "5 users: not stopped"
                # The users leave: the next report ends the wait at once.
                dev.set_users(0)
                left = time.time()
                started = await dev.wait_started("2.0.0")
                assert started - left < 10
                assert dev.notices() == []  # 0 users when it went: nobody to tell
                await dev.wait_state(lambda s: s.installed_version == "2.0.0")
            finally:
                await dev.stop_agents()


async def test_five_users_wait_for_the_window_to_open(tmp_path: Path, agent_log: None) -> None:
    with trio.fail_after(120):
        async with releaser(tmp_path / "data") as handle:
            await _with_v2(tmp_path, handle)
            # A window opening a few seconds after the push (the agent's local time).
            opens = datetime.now().replace(microsecond=0) + timedelta(seconds=12)
            window = _window_from(opens)
            dev = GateDevice(
                tmp_path,
                handle.port,
                5,
                notify_wait=0.5,
                force_deadline=600,
                maintenance_window=window,
            )
            await dev.start_agent()
            try:
                await dev.wait_started("1.0.0")
                await dev.wait_reported(5)
                await push(handle, "2.0.0")
                # As the policy writes it: a time on the minute loses its ":00"
                # (18:31:00 -> 18:31), which made this test fail once a minute.
                shown = Window.parse(window).text
                await _wait_deferred(handle, f"5 users active (waiting for window {shown}")
                started = await dev.wait_started("2.0.0", timeout=60)
                # In the window the users are told, and notify_wait later it goes.
                assert started >= opens.timestamp(), "went before the window opened"
                (notice,) = [n for n in dev.notices() if n["by"] == "1.0.0"][:1]
                assert notice["version"] == "2.0.0" and notice["users"] == 5
                assert notice["received"] >= opens.timestamp() - 0.5
            finally:
                await dev.stop_agents()


async def test_forced_push_goes_after_force_deadline_despite_five_users(
    tmp_path: Path, agent_log: None
) -> None:
    with trio.fail_after(90):
        async with releaser(tmp_path / "data") as handle:
            await _with_v2(tmp_path, handle)
            dev = GateDevice(tmp_path, handle.port, 5, notify_wait=30, force_deadline=3)
            await dev.start_agent()
            try:
                await dev.wait_started("1.0.0")
                await dev.wait_reported(5)
                await push(handle, "2.0.0")
                info = await _wait_deferred(handle, "5 users active (waiting for fewer than 3")
                assert "forced at" in (info.state_error or "")
                held = time.time()
                started = await dev.wait_started("2.0.0")
                assert started - held >= 1.5, "went before force_deadline"
                assert started - held < 15
                s = await dev.wait_state(lambda s: s.installed_version == "2.0.0")
                assert s.installed_version == "2.0.0"
                assert (dev.box / "users").read_text() == "5"  # never dropped
            finally:
                await dev.stop_agents()


async def test_busy_command_holds_the_update_and_garbage_counts_as_unknown(
    tmp_path: Path, agent_log: None
) -> None:
    """No reports: the agent runs busy_command (it prints the users file)."""
    with trio.fail_after(90):
        async with releaser(tmp_path / "data") as handle:
            await _with_v2(tmp_path, handle)
            box = tmp_path / "box"
            dev = GateDevice(
                tmp_path,
                handle.port,
                5,
                notify_wait=30,
                force_deadline=600,
                busy_command=["cat", str(box / "count")],
                busy_timeout=2,
                activity_unknown="wait",
            )
            (box / "count").write_text("5\n")
            dev.set_users(-1)  # the app reports nothing (its report of -1 is refused)
            await dev.start_agent()
            try:
                await dev.wait_started("1.0.0")
                await push(handle, "2.0.0")
                await _wait_deferred(handle, "5 users active (waiting for fewer than 3")
                # Garbage is unknown activity, here "wait"; logged once, not per poll.
                (box / "count").write_text("lots\n")
                await _wait_deferred(handle, "activity unknown (busy_command failed)")
                await trio.sleep(1.0)  # 5 polls
                assert [v for v, _ in dev.starts()] == ["1.0.0"]
                log = dev.log.read_text()
                assert log.count("busy_command cat: it printed 'lots', not a number") == 1, log
                (box / "count").write_text("0\n")
                await dev.wait_started("2.0.0", timeout=20)
                assert "busy_command works again: 0 users" in dev.log.read_text()
            finally:
                await dev.stop_agents()


async def test_a_newer_push_replaces_the_update_waiting_at_the_gate(
    tmp_path: Path, agent_log: None
) -> None:
    with trio.fail_after(120):
        async with releaser(tmp_path / "data") as handle:
            await _with_v2(tmp_path, handle)
            v3 = app_release(tmp_path, "plain_app", "3.0.0")
            await publish_and_approve(handle, tmp_path / "data", v3, "3.0.0")
            dev = GateDevice(tmp_path, handle.port, 5, notify_wait=30, force_deadline=600)
            await dev.start_agent()
            try:
                await dev.wait_started("1.0.0")
                await dev.wait_reported(5)
                await push(handle, "2.0.0")
                await _wait_deferred(handle, "5 users active")
                await push(handle, "3.0.0")
                await dev.wait_state(lambda s: s.staged is not None and s.staged.version == "3.0.0")
                await _wait_deferred(handle, "5 users active")
                dev.set_users(0)
                await dev.wait_started("3.0.0")
                await dev.wait_state(lambda s: s.installed_version == "3.0.0")
                # 2.0.0 left the gate without being applied, and without a failure
                # (before, both went when the users left, and 2.0.0 failed: not staged).
                assert [v for v, _ in dev.starts()] == ["1.0.0", "3.0.0"]
                log = dev.log.read_text()
                assert "update 2.0.0: superseded while it waited at the gate" in log
                assert "update failed 2.0.0" not in log, log
            finally:
                await dev.stop_agents()
