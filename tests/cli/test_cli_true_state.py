"""What the device commands and the releaser say is true (issue 11, item 6, "True state").

A real releaser on 127.0.0.1, the real ``fleetpush`` entry point over dev-1
(the plain app, ``PORT VERSION PID`` in its status file), and a real agent
where the bug was end to end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from fleetpush.client.child_record import record_child
from fleetpush.client.layout import StateLayout
from fleetpush.protocol.keys import private_key_to_pem
from fleetpush.protocol.messages import DeviceInfo
from fleetpush.server import ServerHandle
from fp_agent import FLEETPUSH, AgentDevice
from fp_keys import OPERATOR_KEY
from fp_releaser import publish, publish_and_approve, push, releaser
from fp_trees import app_release

from fleetpush.cli import output
from fleetpush.operator import connect


async def test_the_installed_version_is_never_an_update(tmp_path: Path) -> None:
    # A fresh device (sequence 0) on 1.0.0 with 1.0.0 approved was told 1.0.0
    # is an update: "update_available: true" and rc 0 from update --check.
    with trio.fail_after(60):
        data = tmp_path / "data"
        publish(data, app_release(tmp_path, "plain_app", "1.0.0"), "1.0.0", approved=True)
        async with releaser(data) as handle:
            dev = AgentDevice(tmp_path, handle.port)
            ran = await dev.cli("update", "--check", "--json")
            assert ran.code == 10, ran
            doc = ran.json()
            assert doc["installed"] == "1.0.0" and doc["available"] is False, doc
            ran = await dev.cli("status", "--check", "--json")
            assert ran.code == 0, ran
            doc = ran.json()
            assert doc["update_available"] is False, doc


def _row(handle: ServerHandle) -> dict[str, Any]:
    return dict(handle.services.devices.require("dev-1"))


async def _wait_row(
    handle: ServerHandle, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0
) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while not pred(row := _row(handle)):
            await trio.sleep(0.1)
    return row


async def _console(tmp_path: Path, handle: ServerHandle, *args: str) -> str:
    """``fleetpush ARGS`` (a console command) through the installed script: its stdout."""
    key = tmp_path / "operator.key"
    key.write_bytes(private_key_to_pem(OPERATOR_KEY))
    server = f"127.0.0.1:{handle.port}"
    done = await trio.run_process(
        [FLEETPUSH, *args, "--insecure", "--server", server, "--operator-key", str(key)],
        capture_stdout=True,
        capture_stderr=True,
        cwd=str(tmp_path),
    )
    return str(done.stdout.decode())


async def _devices_json(tmp_path: Path, handle: ServerHandle) -> list[dict[str, Any]]:
    """``fleetpush devices --json`` through the installed script."""
    devices = json.loads(await _console(tmp_path, handle, "devices", "--json"))
    assert isinstance(devices, list)
    return devices


async def _device_info(handle: ServerHandle) -> DeviceInfo:
    async with connect(("127.0.0.1", handle.port), OPERATOR_KEY, name="ops") as op:
        (info,) = await op.list_devices(app="demo")
    return info


@pytest.mark.slow
async def test_a_check_during_a_trial_leaves_the_state_trial(tmp_path: Path) -> None:
    # A periodic check during a trial flipped the releaser's state to up_to_date.
    with trio.fail_after(90):
        data = tmp_path / "data"
        async with releaser(data) as handle:
            await publish_and_approve(
                handle, data, app_release(tmp_path, "plain_app", "1.1.0"), "1.1.0"
            )
            dev = AgentDevice(tmp_path, handle.port, confirm_after=50, trial_seconds=60)
            await dev.start_agent()
            try:
                await dev.wait_owner()
                await push(handle, "1.1.0")
                await _wait_row(handle, lambda r: r["state"] == "trial")
                ran = await dev.cli("status", "--check", "--json")
                assert ran.code == 0, ran
                assert ran.json()["trial"] == "1.1.0", ran
                await trio.sleep(1.0)  # any live progress of the check has arrived
                row = _row(handle)
                assert row["state"] == "trial", row
                # VERSION is the version it runs, marked as on trial (it kept 1.0.0).
                info = await _device_info(handle)
                assert (info.version, info.trial_version) == ("1.1.0", "1.1.0"), info
                assert output.version_text(info) == "1.1.0 (on trial)"
            finally:
                await dev.stop_agents()


@pytest.mark.slow
async def test_a_rollback_shows_rolled_back_the_running_version_and_the_reason(
    tmp_path: Path,
) -> None:
    # A device healthy on its old version after a rollback showed state "failed".
    with trio.fail_after(90):
        data = tmp_path / "data"
        async with releaser(data) as handle:
            await publish_and_approve(
                handle, data, app_release(tmp_path, "plain_app", "1.1.0", "crash"), "1.1.0"
            )
            dev = AgentDevice(tmp_path, handle.port)
            await dev.start_agent()
            try:
                await dev.wait_owner()
                await push(handle, "1.1.0")
                await dev.wait_state(lambda s: s.is_bad("1.1.0") and s.history == (), timeout=60)
                await dev.wait_owner()  # 1.0.0 runs again
                await trio.sleep(0.5)
                row = _row(handle)
                assert row["state"] == "rolled_back", row
                assert row["version"] == "1.0.0", row
                assert "1.1.0" in str(row["last_result"]), row
                # One last_result schema: devices --json and the device's status --json.
                listed = (await _devices_json(tmp_path, handle))[0]["last_result"]
                own = (await dev.cli("status", "--json")).json()["last_result"]
                assert set(listed) == set(own) == {"state", "version", "error", "time"}
                assert listed["state"] == own["state"] == "rolled_back", (listed, own)
                assert listed["version"] == own["version"] == "1.0.0", (listed, own)
                assert "1.1.0" in listed["error"] and "1.1.0" in own["error"], (listed, own)
                await _events_are_clean_and_said_once(tmp_path, handle)
            finally:
                await dev.stop_agents()


async def test_update_no_start_shows_the_installed_version(tmp_path: Path) -> None:
    # After `update --no-start` the releaser's VERSION kept the old version.
    with trio.fail_after(60):
        data = tmp_path / "data"
        async with releaser(data) as handle:
            await publish_and_approve(
                handle, data, app_release(tmp_path, "plain_app", "1.1.0"), "1.1.0"
            )
            dev = AgentDevice(tmp_path, handle.port)
            ran = await dev.cli("update", "--no-start", "--json")
            assert ran.code == 0, ran
            assert dev.state().installed_version == "1.1.0"
            row = await _wait_row(handle, lambda r: r["version"] == "1.1.0", timeout=10)
            info = await _device_info(handle)
            assert info.version == "1.1.0", (row, info)


async def _events_are_clean_and_said_once(tmp_path: Path, handle: ServerHandle) -> None:
    """watch --json: one JSON object a line, numbers to the ms; each step once.

    Events carried Python reprs (``uptime=0.008185524000055011``, lists as
    ``['...']``), ``watch --json`` printed indented JSON over many lines, and
    a step the device sent live and again as a durable outcome was in the
    event log twice ("staged", "trial", "rolled_back").
    """
    lines = await _console(tmp_path, handle, "watch", "--json", "--history", "500", "--for", "1")
    events = [json.loads(line) for line in lines.splitlines()]
    assert events and all(isinstance(e, dict) for e in events), lines
    for e in events:
        for value in (e["time"], *e["data"].values()):
            if isinstance(value, float):
                assert value == round(value, 3), e
    steps = [
        (e["data"]["state"], e["data"]["version"])
        for e in events
        if e["kind"] == "progress" and e["data"].get("state") in ("staged", "rolled_back")
    ]
    assert steps == [("staged", "1.1.0"), ("rolled_back", "1.0.0")], steps
    text = await _console(tmp_path, handle, "watch", "--history", "500", "--for", "1")
    assert "app_status" in text and "['" not in text, text
    assert not re.search(r"\d\.\d{4,}", text), text


@pytest.mark.slow
async def test_status_says_the_app_is_not_running_once_the_agent_stopped(
    tmp_path: Path,
) -> None:
    # `status` showed "app running pid N" for a process gone with the agent.
    with trio.fail_after(60):
        data = tmp_path / "data"
        async with releaser(data) as handle:
            dev = AgentDevice(tmp_path, handle.port)
            await dev.start_agent()
            try:
                await dev.wait_owner()
                while not dev.status.exists():  # the app has written its pid
                    await trio.sleep(0.05)
                app_pid = dev.app_pid()
            finally:
                await dev.stop_agents()
            with pytest.raises(ProcessLookupError):
                os.kill(app_pid, 0)
            ran = await dev.cli("status", "--json")
            assert ran.code == 0, ran
            doc = ran.json()
            assert (doc["app_state"], doc["pid"]) == ("not running (agent stopped)", None), doc
            ran = await dev.cli("status")
            assert "not running (agent stopped)" in ran.out and str(app_pid) not in ran.out, ran
            # A recorded child that is alive (left by a killed agent) is named, by
            # its pid and start time: never a pid alone.
            with subprocess.Popen(["sleep", "30"], start_new_session=True) as orphan:
                try:
                    path = StateLayout.of(dev.state_dir).child_record
                    assert record_child(path, orphan.pid, ("sleep", "30")) is not None
                    doc = (await dev.cli("status", "--json")).json()
                    assert doc["pid"] == orphan.pid, doc
                    assert doc["app_state"] == "running (no agent supervises it)", doc
                finally:
                    orphan.kill()
            orphan.wait()
            doc = (await dev.cli("status", "--json")).json()
            assert doc["app_state"] == "not running (agent stopped)", doc
