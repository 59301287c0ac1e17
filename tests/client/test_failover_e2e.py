"""A device with two releasers fails over when one is killed (issue 15, §2).

Real processes on 127.0.0.1: two ``fleetpush server`` subprocesses (port 0,
each its own data dir until the shared database lands; the device auto-enrols
on both), and a real ``fleetpush agent`` configured with both addresses. kill -9
of the releaser it is connected to: it reconnects to the other (within a
generous bound, no timing assertion), ``fleetpush status`` names the new one,
and the agent's log says it failed over.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import trio
from fp_agent import AgentDevice
from fp_keys import OPERATOR_KEY, key_hex
from fp_releaser import start_releaser_process


def _start(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    proc, port = start_releaser_process(
        "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
        "--operator-key", key_hex(OPERATOR_KEY), "--insecure",
    )  # fmt: skip
    return proc, f"127.0.0.1:{port}"


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


async def _connected_to(dev: AgentDevice, *, not_to: str | None = None) -> dict[str, Any]:
    """The owner's status once its link is up to a releaser other than ``not_to``."""
    from fleetpush.client import local

    while True:
        try:
            doc = await trio.to_thread.run_sync(lambda: local.status(state_dir=dev.state_dir))
        except local.ControlError:
            doc = {}
        where = doc.get("connected_to")
        if doc.get("connection") == "connected" and where not in (None, not_to):
            return doc
        await trio.sleep(0.2)


async def test_kill9_of_the_releaser_moves_the_device_to_the_other(tmp_path: Path) -> None:
    a, addr_a = _start(tmp_path / "releaser-a")
    b, addr_b = _start(tmp_path / "releaser-b")
    procs = {addr_a: a, addr_b: b}
    try:
        dev = AgentDevice(tmp_path, 0, server=[addr_a, addr_b], reconnect_spread=1.0, heartbeat=2.0)
        await dev.start_agent()
        try:
            with trio.fail_after(60):
                first = (await _connected_to(dev))["connected_to"]
            assert first in procs
            other = addr_b if first == addr_a else addr_a

            _stop(procs[first])  # SIGKILL: no goodbye on the wire
            with trio.fail_after(60):  # generous: the target is 30 s on real releasers
                doc = await _connected_to(dev, not_to=first)
            assert doc["connected_to"] == other

            with trio.fail_after(60):
                as_json = await dev.cli("status", "--json")
                as_text = await dev.cli("status")
            assert as_json.code == 0, as_json
            assert as_json.json()["connected_to"] == other
            assert any(
                line.split() == ["connected_to", other] for line in as_text.out.splitlines()
            ), as_text.out
        finally:
            await dev.stop_agents()
        log = dev.log.read_text()
        assert f"failed over from releaser {first} to {other}" in log
    finally:
        for proc in procs.values():
            _stop(proc)


async def test_a_restarted_releaser_is_used_again_when_the_other_dies(tmp_path: Path) -> None:
    """A round keeps trying every address: after A died and B took over, A comes
    back on its port, then B is killed: the device returns to A."""
    a, addr_a = _start(tmp_path / "releaser-a")
    b, addr_b = _start(tmp_path / "releaser-b")
    procs = {addr_a: a, addr_b: b}
    try:
        dev = AgentDevice(tmp_path, 0, server=[addr_a, addr_b], reconnect_spread=1.0, heartbeat=2.0)
        await dev.start_agent()
        try:
            with trio.fail_after(60):
                first = (await _connected_to(dev))["connected_to"]
            second = addr_b if first == addr_a else addr_a
            _stop(procs[first])
            with trio.fail_after(60):
                assert (await _connected_to(dev, not_to=first))["connected_to"] == second
            port = int(first.rsplit(":", 1)[1])
            data_dir = tmp_path / ("releaser-a" if first == addr_a else "releaser-b")
            procs[first], again = start_releaser_process(
                "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}",
                "--operator-key", key_hex(OPERATOR_KEY), "--insecure",
            )  # fmt: skip
            assert again == port
            _stop(procs[second])
            with trio.fail_after(60):
                assert (await _connected_to(dev, not_to=second))["connected_to"] == first
        finally:
            await dev.stop_agents()
        assert f"failed over from releaser {second} to {first}" in dev.log.read_text()
    finally:
        for proc in procs.values():
            _stop(proc)
