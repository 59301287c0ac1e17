"""`fleetpush bench --rollout`: a deployment over a simulated fleet (issue 13's target).

Layout: the releaser in its own process (``fleetpush server``), and one
:mod:`fleetpush.bench.fleet` worker holding ``devices`` real device
sessions. The worker's devices acknowledge the deployment's pushes and
report an update as a device does (``downloading``, ``trial``, then
``committed`` or ``rolled_back``) after ``update_seconds``, without
downloading: what is measured is the deployment's control loop, not the
transfer (``fleetpush bench`` measures that).

Two runs, each a real ``deploy_create`` over the operator protocol:

1. **failing**: ``fail_percent`` (30%) of the devices roll back; phases
   1%,10%,50%,100%, ``--max-concurrent`` ``failing_concurrency``, halt at 5%
   once 20 finished. Measured: how many devices were started in all
   (``affected``: the target is at most 25), and the time from the threshold
   being crossed (replaying the rule over the outcomes in the order the
   devices sent them, with their send times) to the releaser emitting its
   ``halted`` event (``halt_latency_s``, target at most 5 s) and to an
   operator's ``watch`` receiving it.
2. **healthy**: no device fails; the same phases and rule,
   ``healthy_concurrency`` at once: it must complete its 4 phases with no
   halt (``false_halts``: 0), in ``healthy_elapsed_s``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import trio

from fleetpush.demo.processes import Children, peak_rss
from fleetpush.net.keys import generate_private_key
from fleetpush.operator import OperatorClient, connect
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import DeployCreate, DeploymentInfo, Event
from fleetpush.server.rollout_rules import Counts, HaltRule, halt_verdict

from .baseline import BenchError
from .harness import Report, Worker, need_descriptors, workspace

APP = "bench-rollout"
PHASES = ["1%", "10%", "50%", "100%"]


@attrs.define
class RolloutOptions:
    devices: int = 1000
    fail_percent: float = 30.0
    halt_percent: float = 5.0
    min_executed: int = 20
    #: devices updating at once in the failing run: bounds the devices in
    #: flight when the rule trips, and so how many are affected
    failing_concurrency: int = 5
    healthy_concurrency: int = 100
    #: from the command to the device's outcome (download, apply and trial)
    update_seconds: float = 0.5
    workdir: Path | None = None


def run_rollout_bench(opts: RolloutOptions, report: Report) -> dict[str, Any]:
    """Both runs; returns the JSON document. Raises :class:`BenchError`."""
    with workspace("fleetpush-rollout-", opts.workdir) as root:
        return _run(opts, root, report)


def _run(opts: RolloutOptions, root: Path, report: Report) -> dict[str, Any]:
    need_descriptors(opts.devices)
    op_key, rel_key = generate_private_key(), generate_private_key()
    rel_hex = public_bytes(rel_key).hex()
    data_dir = root / "data"
    src = root / "src"
    src.mkdir(parents=True)
    (src / "app.txt").write_text("rollout bench\n")

    from fleetpush.server import publish_release

    for version in ("1.0.1", "1.0.2"):
        publish_release(data_dir, src, app=APP, version=version, signing_keys=[rel_key])
    limit = str(opts.devices + 64)
    with Children(root / "logs") as children:
        server, host, port = children.start_server(
            data_dir,
            operator_keys=[public_bytes(op_key).hex()],
            insecure=True,  # the bench measures the control loop; TLS is measured elsewhere
            release_keys=[rel_hex],
            extra=[
                "--max-connections",
                limit,
                "--max-handshaking",
                limit,
                "--max-handshaking-per-source",
                limit,
            ],
        )
        report(f"releaser pid {server.pid} listening on {host}:{port}")

        async def approve() -> None:
            async with connect((host, port), op_key, name="bench") as op:
                for version in ("1.0.1", "1.0.2"):
                    await op.approve(APP, version)

        trio.run(approve)
        report(f"connecting {opts.devices} simulated devices")
        fleet = Worker(
            children,
            "rollout",
            {
                "host": host,
                "port": port,
                "app": APP,
                "release_key": rel_hex,
                "devices": opts.devices,
                "prefix": "rollout",
                "workdir": str(root / "fleet"),
            },
            root,
        )
        ready = fleet.read(max(60.0, opts.devices * 0.2))
        report(f"{ready['ready']} devices connected")

        fleet.ask(f"simulate {opts.fail_percent:g} {opts.update_seconds:g}", 30)
        report(f"failing run: {opts.fail_percent:g}% of the devices roll back 1.0.1")
        failing = trio.run(_deploy, (host, port), op_key, opts, "1.0.1", opts.failing_concurrency)
        sent = fleet.ask("outcomes", 60)
        doc_fail = _failing_figures(opts, failing, sent)
        report(
            f"  halted: {doc_fail['affected']} devices affected, halt "
            f"{doc_fail['halt_latency_s'] * 1e3:.0f} ms after the threshold was crossed"
        )

        fleet.ask(f"simulate 0 {opts.update_seconds:g}", 30)
        report("healthy run: every device commits 1.0.2")
        healthy = trio.run(_deploy, (host, port), op_key, opts, "1.0.2", opts.healthy_concurrency)
        doc_ok = _healthy_figures(healthy)
        report(
            f"  {doc_ok['healthy_state']}: {doc_ok['healthy_succeeded']} succeeded in "
            f"{doc_ok['healthy_phases_completed']} phases, {doc_ok['healthy_elapsed_s']:.1f}s"
        )
        server_rss = peak_rss(server.pid)
        fleet.quit()
    return {
        "devices": opts.devices,
        "fail_percent": opts.fail_percent,
        "halt_after_failures": opts.halt_percent,
        "min_executed": opts.min_executed,
        "phases": PHASES,
        "failing_max_concurrent": opts.failing_concurrency,
        "healthy_max_concurrent": opts.healthy_concurrency,
        "update_seconds": opts.update_seconds,
        **doc_fail,
        **doc_ok,
        "server_peak_rss_bytes": server_rss,
        "targets": {
            "affected_at_most_25": doc_fail["affected"] <= 25,
            "halt_within_5s": doc_fail["halt_latency_s"] <= 5.0,
            "healthy_completes_4_phases_without_halt": doc_ok["healthy_state"] == "completed"
            and doc_ok["healthy_phases_completed"] == len(PHASES)
            and doc_ok["false_halts"] == 0,
        },
    }


@attrs.frozen
class _Run:
    info: DeploymentInfo
    started: float
    ended: float
    #: (event, wall-clock time the watcher received it) of this deployment
    events: list[tuple[Event, float]]


async def _deploy(
    address: tuple[str, int], key: Any, opts: RolloutOptions, version: str, concurrency: int
) -> _Run:
    """Create the deployment, follow it to its end (halted or completed), return it."""
    events: list[tuple[Event, float]] = []
    done = trio.Event()
    deployment: list[str] = []

    async def follow(watcher: OperatorClient) -> None:
        async for e in watcher.watch():
            if e.kind != "deployment":
                continue
            events.append((e, time.time()))
            if (
                deployment
                and e.data.get("deployment_id") == deployment[0]
                and e.data.get("action") in ("halted", "completed")
            ):
                done.set()

    async with (
        connect(address, key, name="bench") as op,
        connect(address, key, name="bench-watch") as watcher,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(follow, watcher)
        await trio.sleep(0.2)  # the watch is subscribed before anything happens
        t0 = time.time()
        info = await op.deploy_create(
            DeployCreate(
                app=APP,
                version=version,
                all=True,
                phases=PHASES,
                max_concurrent=concurrency,
                halt_after_failures=opts.halt_percent,
                min_executed=opts.min_executed,
                on_halt="pause",
            )
        )
        deployment.append(info.deployment_id)
        with trio.move_on_after(300):
            while not done.is_set():
                # Polled too: a deployment that ended before the watch saw it.
                shown = await op.deploy_show(info.deployment_id)
                if shown.state in ("halted", "completed"):
                    break
                with trio.move_on_after(1.0):
                    await done.wait()
        ended = time.time()
        # A halted deployment must start nobody after the halt: give it time to.
        await trio.sleep(2.0 + opts.update_seconds)
        final = await op.deploy_show(info.deployment_id)
        if final.state not in ("completed", "aborted"):
            await op.deploy_abort(info.deployment_id)
        nursery.cancel_scope.cancel()
    mine = [(e, t) for e, t in events if e.data.get("deployment_id") == info.deployment_id]
    return _Run(info=final, started=t0, ended=ended, events=mine)


def _failing_figures(opts: RolloutOptions, run: _Run, sent: dict[str, Any]) -> dict[str, Any]:
    halted = [(e, t) for e, t in run.events if e.data.get("action") == "halted"]
    if run.info.state != "halted" or not halted:
        raise BenchError(f"the failing deployment did not halt (it is {run.info.state})")
    (event, seen), *more = halted
    rule = HaltRule(failure_percent=opts.halt_percent, min_executed=opts.min_executed)
    crossed: float | None = None
    ok = failed = 0
    for t, _device, state in sorted(tuple(o) for o in sent["outcomes"]):
        ok += state == "committed"
        failed += state == "rolled_back"
        if halt_verdict(rule, Counts(succeeded=ok, failed=failed)).halt:
            crossed = float(t)
            break
    if crossed is None:
        raise BenchError("the devices' outcomes never crossed the threshold, yet it halted")
    started = sum(n for s, n in run.info.counts.items() if s not in ("pending", "skipped"))
    return {
        "affected": started,
        "affected_by_devices": int(sent["started"]),
        "failing_counts": run.info.counts,
        "halt_reason": run.info.reason,
        "halt_latency_s": round(max(0.0, event.time - crossed), 3),
        "halt_seen_by_watch_s": round(max(0.0, seen - crossed), 3),
        "halt_events": 1 + len(more),
        "halted_after_s": round(event.time - run.started, 3),
    }


def _healthy_figures(run: _Run) -> dict[str, Any]:
    phases = sum(1 for e, _ in run.events if e.data.get("action") == "phase")
    halts = sum(1 for e, _ in run.events if e.data.get("action") == "halted")
    return {
        "healthy_state": run.info.state,
        "healthy_counts": run.info.counts,
        "healthy_succeeded": run.info.counts.get("succeeded", 0),
        # The first phase opens at creation; each ``phase`` event opens another.
        "healthy_phases_completed": (phases + 1) if run.info.state == "completed" else phases,
        "false_halts": halts,
        "healthy_elapsed_s": round(run.ended - run.started, 3),
    }
