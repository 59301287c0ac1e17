"""Deployments end to end: the real ``fleetpush`` entry point, a real releaser, real agents.

Four devices, each a ``fleetpush agent`` supervising the plain test app. The
release 1.1.0 crashes on the two devices flagged for it (``status.crash``,
tests/apps/plain_app), so their agents roll back; one device at a time and a
halt at the first failure: the deployment halts, the devices after it are
never started (they keep 1.0.0), and the release is paused. Then a healthy
1.2.0 completes its two phases on every device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from fleetpush.protocol.keys import private_key_to_pem
from fleetpush.server import ServerHandle
from fp_agent import FLEETPUSH, AgentDevice, Ran
from fp_keys import OPERATOR_KEY
from fp_releaser import publish_and_approve, releaser
from fp_trees import app_release

pytestmark = pytest.mark.slow


async def _console(tmp_path: Path, handle: ServerHandle, *args: str) -> Ran:
    """``fleetpush ARGS`` as an operator, through the installed script."""
    key = tmp_path / "operator.key"
    if not key.exists():
        key.write_bytes(private_key_to_pem(OPERATOR_KEY))
    server = f"127.0.0.1:{handle.port}"
    done = await trio.run_process(
        [FLEETPUSH, *args, "--insecure", "--server", server, "--operator-key", str(key)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=str(tmp_path),
    )
    return Ran(done.returncode, done.stdout.decode(), done.stderr.decode())


async def _show(tmp_path: Path, handle: ServerHandle, deployment_id: str) -> dict[str, Any]:
    ran = await _console(tmp_path, handle, "deploy", "show", deployment_id, "--json")
    assert ran.code == 0, ran
    return ran.json()


async def _until_state(
    tmp_path: Path, handle: ServerHandle, deployment_id: str, state: str, timeout: float
) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while (doc := await _show(tmp_path, handle, deployment_id))["state"] != state:
            await trio.sleep(0.5)
    return doc


def _error(ran: Ran) -> str:
    """The one line a failed command printed (the plain-TCP warning aside)."""
    lines = [line for line in ran.err.splitlines() if "warning: plain TCP" not in line]
    assert len(lines) == 1, ran
    return lines[0]


def _runs(dev: AgentDevice) -> str:
    """The version the app itself says it runs (``PORT VERSION PID``)."""
    return dev.status.read_text().split()[1]


async def test_a_deployment_halts_on_failures_then_a_healthy_one_completes(
    tmp_path: Path,
) -> None:
    with trio.fail_after(240):
        data = tmp_path / "data"
        async with releaser(data) as handle:
            await publish_and_approve(
                handle,
                data,
                app_release(tmp_path, "plain_app", "1.1.0", "crash-if-flagged"),
                "1.1.0",
            )
            devs = [
                AgentDevice(tmp_path / f"d{i}", handle.port, device_id=f"d{i}") for i in range(4)
            ]
            for dev in devs[:2]:
                dev.root.mkdir(parents=True, exist_ok=True)
                Path(str(dev.status) + ".crash").write_text("")
            try:
                for dev in devs:
                    await dev.start_agent()
                for dev in devs:
                    await dev.wait_owner()

                # Refused before anything starts: one sentence and the README's exit code.
                ran = await _console(tmp_path, handle, "deploy", "create", "demo", "9.9.9", "--all")
                assert ran.code == 5 and _error(ran) == (
                    "fleetpush: creating the deployment: no release demo 9.9.9"
                ), ran
                ran = await _console(
                    tmp_path, handle, "deploy", "create", "demo", "1.1.0", "--all",
                    "--min-executed", "3",
                )  # fmt: skip
                assert ran.code == 2 and "--halt-after-failures" in ran.err, ran

                ran = await _console(
                    tmp_path, handle, "deploy", "create", "demo", "1.1.0", "--all",
                    "--max-concurrent", "1", "--halt-after-failures", "1%",
                    "--min-executed", "1", "--on-halt", "pause", "--json",
                )  # fmt: skip
                assert ran.code == 0, ran
                first = ran.json()["deployment_id"]
                doc = await _until_state(tmp_path, handle, first, "halted", 120)
                assert "halt threshold" in doc["reason"], doc
                await trio.sleep(2.0)  # a halted deployment starts nothing more
                doc = await _show(tmp_path, handle, first)
                outcomes = [d["state"] for d in doc["devices"]]  # by rollout order
                assert outcomes.count("failed") == 1, doc
                failed_at = outcomes.index("failed")
                assert outcomes[:failed_at] == ["succeeded"] * failed_at, outcomes
                assert outcomes[failed_at + 1 :] == ["pending"] * (3 - failed_at), outcomes
                by_id = {f"d{i}": dev for i, dev in enumerate(devs)}
                for d in doc["devices"]:
                    dev = by_id[d["device_id"]]
                    if d["state"] == "failed":
                        assert "rolled back" in d["reason"] and "1.1.0" in d["reason"], d
                        assert _runs(dev) == "1.0.0"
                    elif d["state"] == "pending":
                        # Never started: still on its version, never pushed.
                        assert dev.state().installed_version == "1.0.0", d
                        assert _runs(dev) == "1.0.0"
                    else:
                        assert d["reason"] == "committed 1.1.0", d
                        assert _runs(dev) == "1.1.0"
                ran = await _console(tmp_path, handle, "release", "list", "--json")
                assert ran.code == 0, ran
                (release,) = [r for r in json.loads(ran.out) if r["version"] == "1.1.0"]
                assert release["status"] == "paused", release
                ran = await _console(tmp_path, handle, "deploy", "show", first)
                assert ran.code == 0 and "halted" in ran.out and "rolled back" in ran.out, ran
                ran = await _console(
                    tmp_path, handle, "watch", "--json", "--history", "1000", "--for", "0.5"
                )
                halted = [
                    e
                    for e in map(json.loads, ran.out.splitlines())
                    if e["kind"] == "deployment" and e["data"]["action"] == "halted"
                ]
                assert len(halted) == 1 and halted[0]["data"]["release"] == "paused", halted

                # The audit trail of that deployment: its halt and each device's outcome.
                ran = await _console(tmp_path, handle, "events", "--deployment", first, "--json")
                assert ran.code == 0, ran
                trail = json.loads(ran.out)
                assert {e["data"]["deployment_id"] for e in trail} == {first}, trail
                seen = {
                    (e["kind"], e["data"].get("action") or e["data"].get("state")) for e in trail
                }
                assert {("deployment", "halted"), ("deployment_device", "failed")} <= seen, seen
                assert ("push", None) in seen  # each start is an ordinary push

                ran = await _console(tmp_path, handle, "deploy", "abort", first)
                assert ran.code == 0 and "aborted" in ran.out, ran

                # A healthy release: two phases, pause and resume on the way.
                await publish_and_approve(
                    handle, data, app_release(tmp_path, "plain_app", "1.2.0"), "1.2.0"
                )
                ran = await _console(
                    tmp_path, handle, "deploy", "create", "demo", "1.2.0", "--all",
                    "--phases", "1,100%", "--max-concurrent", "2",
                    "--halt-after-failures", "50%", "--min-executed", "2", "--json",
                )  # fmt: skip
                assert ran.code == 0, ran
                second = ran.json()["deployment_id"]
                assert ran.json()["phases"] == [1, 4]
                ran = await _console(tmp_path, handle, "deploy", "pause", second)
                assert ran.code == 0 and "paused" in ran.out, ran
                ran = await _console(tmp_path, handle, "deploy", "resume", second)
                assert ran.code == 0 and "running" in ran.out, ran
                doc = await _until_state(tmp_path, handle, second, "completed", 150)
                assert doc["counts"] == {"succeeded": 4}, doc
                for dev in devs:
                    await dev.wait_owner()
                    assert _runs(dev) == "1.2.0"
                ran = await _console(tmp_path, handle, "deploy", "list")
                assert ran.code == 0 and first in ran.out and second in ran.out, ran
                ran = await _console(tmp_path, handle, "deploy", "show", "nope")
                assert ran.code == 5, ran
                assert _error(ran) == "fleetpush: showing the deployment: no deployment 'nope'"
            finally:
                for dev in devs:
                    await dev.stop_agents()
