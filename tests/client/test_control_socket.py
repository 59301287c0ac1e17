"""The agent's control socket and the one-owner rule (issue 11), on real processes.

A real ``fleetpush agent`` (its releaser unreachable where the releaser plays
no part: the app runs anyway), the app's helper ``fleetpush.client.local``
from inside the supervised app, and raw clients that misbehave.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest
import trio
from fleet_helpers import read_status
from fleetpush.client import local
from fleetpush.client.layout import StateLayout
from fleetpush.client.local import ControlError
from fp_agent import AgentDevice

#: An app that reports what fleetpush gave it: its environment, and what the
#: helper answers from inside it, then stays up like a service.
ENV_APP = """
import json, os, sys, time
from fleetpush.client import local
seen = {k: os.environ.get(k) for k in ("FLEETPUSH_VERSION", "FLEETPUSH_CONTROL_SOCKET")}
for _ in range(100):
    try:
        seen["status"] = local.status()
        seen["activity"] = local.report_activity(users=3)
        break
    except local.ControlError as e:
        seen["error"] = str(e)
        time.sleep(0.1)
open(sys.argv[1] + ".tmp", "w").write(json.dumps(seen))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def _raw(path: Path, data: bytes) -> dict[str, object]:
    """Send ``data`` as is and read one answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        buf = b""
        while not buf.endswith(b"\n"):
            more = s.recv(65536)
            if not more:
                break
            buf += more
    doc = json.loads(buf)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture
def agent_log(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    log = tmp_path / "device" / "agent.log"
    if log.exists():
        print(log.read_text()[-6000:])


async def test_socket_is_private_and_a_second_agent_is_refused(
    tmp_path: Path, agent_log: None
) -> None:
    with trio.fail_after(60):
        dev = AgentDevice(tmp_path, 9)  # releaser unreachable: the app runs anyway
        first = await dev.start_agent()
        try:
            doc = await dev.wait_owner()
            layout = StateLayout.of(dev.state_dir)
            sock = layout.control_socket
            assert stat.S_ISSOCK(sock.stat().st_mode)
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            assert doc["control_socket"] == str(sock)
            assert doc["owner_pid"] == first.pid and doc["owner"] == "agent"
            _, _, app_pid = await read_status(dev.status, "1.0.0")
            # A second agent on the same state dir: one sentence naming the holder, exit 1,
            # and the first agent's app untouched (no leftover-stopping of a live child).
            second = await dev.cli("agent", "--", sys.executable, "-c", "pass")
            assert second.code == 1, second
            lines = second.err.strip().splitlines()
            assert len(lines) == 1 and f"pid {first.pid}" in lines[0], second.err
            os.kill(app_pid, 0)
            assert dev.app_pid() == app_pid
            assert first.returncode is None
        finally:
            codes = await dev.stop_agents()
        assert codes[0] == 0
        assert not sock.exists()  # removed by its owner on the way out


async def test_the_app_sees_its_version_and_the_socket(tmp_path: Path, agent_log: None) -> None:
    with trio.fail_after(60):
        dev = AgentDevice(tmp_path, 9)
        report = tmp_path / "seen.json"
        await dev.start_agent([sys.executable, "-c", ENV_APP, str(report)])
        try:
            while not report.exists():
                await trio.sleep(0.1)
            seen = json.loads(report.read_text())
            sock = str(StateLayout.of(dev.state_dir).control_socket)
            assert seen["FLEETPUSH_VERSION"] == "1.0.0"
            assert seen["FLEETPUSH_CONTROL_SOCKET"] == sock
            assert seen["status"]["installed"] == "1.0.0"
            assert seen["status"]["control_socket"] == sock
            assert seen["activity"]["users"] == 3
            # ... and status shows what the app reported
            ran = await dev.cli("status", "--json")
            assert ran.code == 0, ran
            assert ran.json()["activity"]["users"] == 3
        finally:
            await dev.stop_agents()


async def test_bad_requests_get_an_error_and_a_code(tmp_path: Path, agent_log: None) -> None:
    with trio.fail_after(60):
        dev = AgentDevice(tmp_path, 9)
        await dev.start_agent()
        try:
            await dev.wait_owner()
            sock = StateLayout.of(dev.state_dir).control_socket
            cases = {
                "not JSON": b"hello\n",
                "not an object": b"[1]\n",
                "unknown request": b'{"op": "format-disk"}\n',
                "bad activity": b'{"op": "report_activity", "users": -1}\n',
                "unknown app action": b'{"op": "app", "action": "explode"}\n',
                "no newline, too long": b"x" * (local.MAX_REQUEST + 10),
            }
            for name, data in cases.items():
                answer = await trio.to_thread.run_sync(_raw, sock, data)
                assert answer.get("code") == local.CODE_USAGE, (name, answer)
                assert isinstance(answer.get("error"), str) and answer["error"], name
            # nothing to apply: exit code 10, as `update` would say
            with pytest.raises(ControlError) as err:
                await trio.to_thread.run_sync(
                    lambda: local.request("apply-staged", state_dir=dev.state_dir)
                )
            assert err.value.code == local.CODE_NO_UPDATE
            # and the owner is still serving
            doc = await trio.to_thread.run_sync(lambda: local.status(state_dir=dev.state_dir))
            assert doc["installed"] == "1.0.0"
        finally:
            await dev.stop_agents()


async def test_without_an_agent_commands_act_alone_and_app_refuses(tmp_path: Path) -> None:
    with trio.fail_after(60):
        dev = AgentDevice(tmp_path, 9)  # nothing listens on port 9 either
        ran = await dev.cli("status", "--json")
        assert ran.code == 0, ran  # no releaser asked, so none needed
        doc = ran.json()
        assert doc["installed"] == "1.0.0" and doc["control_socket"] is None
        ran = await dev.cli("app", "restart")
        assert ran.code == 1 and "no agent runs" in ran.err, ran
        with pytest.raises(local.NoOwner):
            local.status(state_dir=dev.state_dir)
