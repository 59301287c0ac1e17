"""Deployments on a real releaser over 127.0.0.1 (specs/PROTOCOL.md §7.7.1).

The devices here speak the protocol only (server_helpers.connect): on a
command they acknowledge and report what their behaviour says (``ok``:
downloading, trial, committed; ``slow``: the same a second later; ``fail``:
rolled_back; ``defer``: deferred, nothing after; ``silent``: nothing),
so the scheduler's rules are tested in seconds. The same rules with real
agents and a real app are in tests/cli/test_cli_deploy.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol.errors import Conflict
from fleetpush.protocol.messages import CheckUpdate, DeployCreate, DeploymentInfo, UpdateProgress
from fleetpush.server import ServerConfig
from fp_releaser import approve, running_releaser
from server_helpers import Device, connect, publish, wait_for

from fleetpush.operator import OperatorClient
from fleetpush.operator import connect as operator_connect

DEFERRED = "3 users active (waiting for window 02:00-06:00)"


class Fleet:
    """Protocol-level devices that act on commands as their behaviour says."""

    def __init__(self, port: int, behaviours: dict[str, str]) -> None:
        self.port = port
        self.behaviours = behaviours
        #: device id -> the commands it received
        self.commands: dict[str, list[Any]] = {d: [] for d in behaviours}
        self.devices: dict[str, Device] = {}

    async def _act(self, device: Device) -> None:
        seen = 0
        while True:
            if len(device.commands) == seen:
                await device.command_received.wait()
            for _method, cmd in device.commands[seen:]:
                self.commands[device.device_id].append(cmd)
                behaviour = self.behaviours[device.device_id]
                if behaviour == "silent":
                    continue
                if behaviour == "defer":
                    await device.peer.notify(
                        "update_progress",
                        UpdateProgress(state="deferred", app="demo", version=cmd.version,
                                       push_id=cmd.push_id, error=DEFERRED),
                    )  # fmt: skip
                    continue
                await trio.sleep(1.0 if behaviour == "slow" else 0.05)
                steps = [("downloading", cmd.version, None), ("trial", cmd.version, None)]
                if behaviour in ("ok", "slow"):
                    steps.append(("committed", cmd.version, None))
                else:
                    steps.append(("rolled_back", "1.0", f"{cmd.version}: the app crashed"))
                for state, version, error in steps:
                    await device.peer.notify(
                        "update_progress",
                        UpdateProgress(
                            state=state,
                            app="demo",
                            version=version,
                            # A trial's outcome names no push (§7.4), like the real device.
                            push_id=cmd.push_id if state == "downloading" else "",
                            error=error,
                        ),
                    )
                    await trio.sleep(0.02)
            seen = len(device.commands)

    async def run_one(
        self, device_id: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with connect(self.port, KEYS[device_id], peer_id=device_id) as device:
            self.devices[device_id] = device
            async with trio.open_nursery() as n:
                n.start_soon(self._act, device)
                task_status.started()


KEYS: dict[str, Ed25519PrivateKey] = {f"d{i}": Ed25519PrivateKey.generate() for i in range(12)}


@asynccontextmanager
async def fleet(port: int, behaviours: dict[str, str]) -> AsyncIterator[Fleet]:
    f = Fleet(port, behaviours)
    async with trio.open_nursery() as n:
        for device_id in behaviours:
            await n.start(f.run_one, device_id)
        yield f
        n.cancel_scope.cancel()


@asynccontextmanager
async def setup(
    tmp_path: Path, config: ServerConfig, behaviours: dict[str, str]
) -> AsyncIterator[tuple[Any, Fleet, OperatorClient]]:
    publish(config.data_dir, tmp_path, "2.0", key=None)
    async with AsyncExitStack() as stack:
        handle = await stack.enter_async_context(running_releaser(config))
        await approve(handle, "2.0", key=OPERATOR)
        f = await stack.enter_async_context(fleet(handle.port, behaviours))
        op = await stack.enter_async_context(
            operator_connect(("127.0.0.1", handle.port), OPERATOR, name="ops")
        )
        yield handle, f, op


OPERATOR = Ed25519PrivateKey.generate()


@pytest.fixture
def cfg(tmp_path: Path, config: ServerConfig) -> ServerConfig:
    from fleetpush.protocol.keys import public_bytes

    # Releases unsigned (publish key=None) are fine for protocol-level devices.
    return ServerConfig(
        data_dir=config.data_dir,
        port=0,
        operator_keys=[public_bytes(OPERATOR)],
        heartbeat=5.0,
        handshake_timeout=2.0,
        frame_timeout=1.0,
        send_timeout=2.0,
        grace_period=1.0,
    )


async def _until(
    op: OperatorClient,
    deployment_id: str,
    pred: Callable[[DeploymentInfo], bool],
    timeout: float = 15,
) -> DeploymentInfo:
    with trio.fail_after(timeout):
        while True:
            info = await op.deploy_show(deployment_id)
            if pred(info):
                return info
            await trio.sleep(0.05)


def _kinds(handle: Any, deployment_id: str, action: str) -> int:
    events = handle.services.events.history(10_000)
    return sum(
        1
        for e in events
        if e.kind == "deployment"
        and e.data.get("deployment_id") == deployment_id
        and e.data.get("action") == action
    )


async def test_a_failing_release_halts_starts_no_more_and_pauses_the_release(
    tmp_path: Path, cfg: ServerConfig
) -> None:
    behaviours = {f"d{i}": ("fail" if i % 2 else "ok") for i in range(10)}
    with trio.fail_after(60):
        async with setup(tmp_path, cfg, behaviours) as (handle, f, op):
            info = await op.deploy_create(
                DeployCreate(
                    app="demo",
                    version="2.0",
                    all=True,
                    max_concurrent=2,
                    halt_after_failures=30,
                    min_executed=4,
                )
            )
            info = await _until(op, info.deployment_id, lambda i: i.state == "halted")
            assert "halt threshold" in info.reason, info.reason
            failed = info.counts.get("failed", 0)
            finished = failed + info.counts.get("succeeded", 0)
            assert finished >= 4 and failed * 100 >= 30 * finished, info.counts
            # Nothing is started after the halt, however long we wait.
            started = {d.device_id for d in info.devices if d.state != "pending"}
            await trio.sleep(1.5)
            after = await op.deploy_show(info.deployment_id)
            assert {d.device_id for d in after.devices if d.state != "pending"} == started
            # Started in all: those finished when it halted, plus at most one still in
            # flight then (max_concurrent 2, and the halting device had just finished).
            m = re.search(r"of (\d+) finished", info.reason)
            assert m is not None, info.reason
            assert 10 - after.counts.get("pending", 0) <= int(m.group(1)) + 1, after.counts
            assert all(not f.commands[d.device_id] for d in after.devices if d.state == "pending")
            for d in after.devices:
                if d.state == "failed":
                    assert "rolled back" in d.reason and "crashed" in d.reason, d
            # The release is paused for every channel: offered to nobody.
            (release,) = [r for r in await op.list_releases(app="demo") if r.version == "2.0"]
            assert release.status == "paused"
            for channel in ("stable", "beta"):
                offer = await f.devices["d0"].request(
                    "check_update", CheckUpdate(app="demo", version="1.0", channel=channel)
                )
                assert not offer.available, channel
            assert _kinds(handle, info.deployment_id, "halted") == 1


async def test_failures_crossing_the_threshold_together_halt_once(
    tmp_path: Path, cfg: ServerConfig
) -> None:
    behaviours = {f"d{i}": "fail" for i in range(6)}
    with trio.fail_after(60):
        async with setup(tmp_path, cfg, behaviours) as (handle, _f, op):
            info = await op.deploy_create(
                DeployCreate(
                    app="demo",
                    version="2.0",
                    all=True,
                    max_concurrent=6,
                    halt_after_failures=10,
                    min_executed=1,
                    on_halt="revoke",
                )
            )
            await _until(op, info.deployment_id, lambda i: i.counts.get("failed", 0) == 6)
            assert _kinds(handle, info.deployment_id, "halted") == 1
            info = await op.deploy_show(info.deployment_id)
            assert info.state == "halted"
            (release,) = await op.list_releases(app="demo")
            assert release.status == "revoked"
            # A revoked release cannot be resumed into.
            with pytest.raises(Conflict):
                await op.deploy_resume(info.deployment_id)


async def test_a_healthy_deployment_completes_its_phases_in_order(
    tmp_path: Path, cfg: ServerConfig
) -> None:
    behaviours = {f"d{i}": "ok" for i in range(8)}
    with trio.fail_after(60):
        async with setup(tmp_path, cfg, behaviours) as (handle, _f, op):
            info = await op.deploy_create(
                DeployCreate(
                    app="demo",
                    version="2.0",
                    all=True,
                    phases=["1", "50%", "100%"],
                    halt_after_failures=5,
                    min_executed=1,
                )
            )
            assert info.phases == [1, 4, 8]
            info = await _until(op, info.deployment_id, lambda i: i.state == "completed")
            assert info.counts == {"succeeded": 8}, info.counts
            assert all(d.reason == "committed 2.0" for d in info.devices)
            # Phase by phase: no device of a phase started before the one before finished.
            by_phase: dict[int, list[Any]] = {}
            for d in info.devices:
                by_phase.setdefault(d.phase, []).append(d)
            for p in range(1, 3):
                assert min(d.started for d in by_phase[p]) >= max(
                    d.finished for d in by_phase[p - 1]
                )
            assert _kinds(handle, info.deployment_id, "phase") == 2
            assert _kinds(handle, info.deployment_id, "halted") == 0


async def test_a_silent_device_fails_after_the_device_timeout(
    tmp_path: Path, cfg: ServerConfig
) -> None:
    behaviours = {"d0": "silent", "d1": "ok"}
    with trio.fail_after(60):
        async with setup(tmp_path, cfg, behaviours) as (_handle, _f, op):
            info = await op.deploy_create(
                DeployCreate(app="demo", version="2.0", all=True, device_timeout=2)
            )
            info = await _until(op, info.deployment_id, lambda i: i.state == "completed")
            (d0,) = [d for d in info.devices if d.device_id == "d0"]
            assert d0.state == "failed" and "no progress for 2s" in d0.reason, d0


async def test_pause_resume_abort(tmp_path: Path, cfg: ServerConfig) -> None:
    # Slow devices (a second each): the abort below lands while the third updates.
    behaviours = {f"d{i}": "slow" for i in range(4)}
    with trio.fail_after(60):
        async with setup(tmp_path, cfg, behaviours) as (_handle, _f, op):
            # Start nothing yet: pause before the scheduler's first round is not
            # guaranteed, so create it with one device at a time and pause at once.
            info = await op.deploy_create(
                DeployCreate(app="demo", version="2.0", all=True, max_concurrent=1)
            )
            paused = await op.deploy_pause(info.deployment_id)
            assert paused.state == "paused"
            await trio.sleep(1.0)
            shown = await op.deploy_show(info.deployment_id)
            assert shown.counts.get("started", 0) + shown.counts.get("succeeded", 0) <= 1
            assert shown.counts.get("pending", 0) >= 3
            resumed = await op.deploy_resume(info.deployment_id)
            assert resumed.state == "running"
            await _until(op, info.deployment_id, lambda i: i.counts.get("succeeded", 0) >= 2)
            aborted = await op.deploy_abort(info.deployment_id)
            assert aborted.state == "aborted"
            await trio.sleep(1.0)
            shown = await op.deploy_show(info.deployment_id)
            started = sum(1 for d in shown.devices if d.state != "pending")
            assert shown.counts.get("pending", 0) >= 1 and started <= 3, shown.counts
            with pytest.raises(Conflict):
                await op.deploy_resume(info.deployment_id)
            # Another deployment of the app may start once this one is aborted.
            again = await op.deploy_create(DeployCreate(app="demo", version="2.0", all=True))
            assert again.counts.get("skipped", 0) >= 2  # they already run 2.0


async def test_one_active_deployment_per_app(tmp_path: Path, cfg: ServerConfig) -> None:
    with trio.fail_after(60):
        async with setup(tmp_path, cfg, {"d0": "silent"}) as (_handle, _f, op):
            info = await op.deploy_create(DeployCreate(app="demo", version="2.0", all=True))
            with pytest.raises(Conflict, match=f"abort it first.*{info.deployment_id}"):
                await op.deploy_create(DeployCreate(app="demo", version="2.0", all=True))


async def test_a_halt_survives_a_restart_and_offline_devices_join(
    tmp_path: Path, cfg: ServerConfig
) -> None:
    behaviours = {f"d{i}": ("fail" if i < 2 else "ok") for i in range(4)}
    with trio.fail_after(90):
        publish(cfg.data_dir, tmp_path, "2.0", key=None)
        async with running_releaser(cfg) as handle:
            await approve(handle, "2.0", key=OPERATOR)
            async with operator_connect(("127.0.0.1", handle.port), OPERATOR) as op:
                # Enrol every device, then let only d0 and d1 (the failing ones) stay.
                async with fleet(handle.port, behaviours):
                    pass
                # Their links are gone before the deployment looks for online devices.
                await wait_for(lambda: len(handle.services.fleet) == 0)
                async with fleet(handle.port, {"d0": "fail", "d1": "fail"}):
                    info = await op.deploy_create(
                        DeployCreate(
                            app="demo",
                            version="2.0",
                            all=True,
                            halt_after_failures=50,
                            min_executed=2,
                        )
                    )
                    await _until(op, info.deployment_id, lambda i: i.state == "halted")
        async with AsyncExitStack() as stack:
            handle = await stack.enter_async_context(running_releaser(cfg))
            op = await stack.enter_async_context(
                operator_connect(("127.0.0.1", handle.port), OPERATOR)
            )
            f = await stack.enter_async_context(fleet(handle.port, behaviours))
            await trio.sleep(1.5)  # several scheduler rounds with everyone online
            shown = await op.deploy_show(info.deployment_id)
            assert shown.state == "halted", shown
            assert not any(f.commands[d] for d in ("d2", "d3")), f.commands
            # Resuming un-pauses the release and the offline-then-online devices join.
            await op.deploy_resume(info.deployment_id)
            done = await _until(op, info.deployment_id, lambda i: i.state == "completed")
            assert done.counts == {"failed": 2, "succeeded": 2}, done.counts
            (release,) = await op.list_releases(app="demo")
            assert release.status == "approved"
            await wait_for(lambda: bool(f.commands["d3"]))


async def test_a_success_reaching_min_executed_halts_when_failures_are_over_the_share(
    tmp_path: Path, cfg: ServerConfig
) -> None:
    # Both start at once; d0 fails first (1 finished: under min_executed), then
    # d1 succeeds: 1 of 2 failed is 50%, over 10%, so that success halts it.
    behaviours = {"d0": "fail", "d1": "slow"}
    with trio.fail_after(60):
        async with setup(tmp_path, cfg, behaviours) as (_handle, _f, op):
            info = await op.deploy_create(
                DeployCreate(
                    app="demo", version="2.0", all=True, halt_after_failures=10, min_executed=2
                )
            )
            info = await _until(op, info.deployment_id, lambda i: i.state != "running")
            assert info.state == "halted", info
            assert info.counts == {"failed": 1, "succeeded": 1}, info.counts


async def test_a_deferred_device_is_neither_and_holds_no_slot(
    tmp_path: Path, cfg: ServerConfig
) -> None:
    behaviours = {"d0": "defer", "d1": "ok", "d2": "ok"}
    with trio.fail_after(60):
        async with setup(tmp_path, cfg, behaviours) as (_handle, _f, op):
            info = await op.deploy_create(
                DeployCreate(
                    app="demo",
                    version="2.0",
                    all=True,
                    max_concurrent=1,
                    halt_after_failures=0,
                    min_executed=1,
                )
            )
            # One slot: d1 and d2 can only both finish if the deferred d0 let go of it.
            info = await _until(op, info.deployment_id, lambda i: i.state == "completed")
            assert info.counts == {"deferred": 1, "succeeded": 2}, info.counts
            (d0,) = [d for d in info.devices if d.device_id == "d0"]
            assert d0.reason == DEFERRED


async def test_the_deployments_gauge_follows_their_states(
    tmp_path: Path, cfg: ServerConfig
) -> None:
    import urllib.request

    import attrs

    def scrape(url: str) -> str:
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    cfg = attrs.evolve(cfg, metrics="127.0.0.1:0", metrics_interval=0.1)
    with trio.fail_after(60):
        async with setup(tmp_path, cfg, {"d0": "silent"}) as (handle, _f, op):

            async def until_scraped(line: str) -> str:
                with trio.fail_after(10):  # the gauges are copied every 0.1 s
                    while line not in (text := await trio.to_thread.run_sync(scrape, url)):
                        await trio.sleep(0.1)
                return text

            url = handle.metrics_url
            info = await op.deploy_create(DeployCreate(app="demo", version="2.0", all=True))
            await until_scraped('fleetpush_deployments{state="running"} 1.0')
            await op.deploy_abort(info.deployment_id)
            text = await until_scraped('fleetpush_deployments{state="aborted"} 1.0')
            assert 'fleetpush_deployments{state="running"}' not in text
