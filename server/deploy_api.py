"""Operator methods of deployments (specs/PROTOCOL.md §7.7.1).

Each handler takes ``(services, call, params)`` like those of operator_api.py.
``deploy_create`` checks the request and resolves its targets here; the
lifecycle (start, halt, pause, resume, abort) is the scheduler's
(rollout.py), whose every change is committed before the answer.
"""

from __future__ import annotations

import functools
import math
import secrets
import time

from fleetpush.protocol.messages import (
    DeployCreate,
    DeployFilter,
    DeployList,
    DeploymentInfo,
    DeployRef,
    DeployShow,
)

from .call import Call
from .deployments import Deployment, DeploymentStore, rollout_order
from .errors import BadRequest, Conflict, NotFound
from .rollout_rules import PhaseError, phase_sizes
from .services import Services
from .targets import named_targets, pushable_release


async def deploy_create(services: Services, call: Call, p: DeployCreate) -> DeploymentInfo:
    """Create a deployment and hand it to the scheduler.

    Its reads and its rows run off the trio thread on PostgreSQL
    (db_calls.py: ``_plan``, then Rollouts.create); the event is emitted on
    the trio thread. Raises NotFound (release, device, no target), Conflict
    (release not pushable, another active deployment of the app, a device of
    another app or not accepted), BadRequest (targets, phases, rule).
    """
    if p.halt_after_failures is None and p.min_executed != 1:
        raise BadRequest("min_executed needs halt_after_failures (the rule it belongs to)")
    dep, devices = await services.calls.run(_plan, services, call.operator or "?", p)
    await services.rollouts.create(dep, devices)
    call.log.info(
        "deployment %s: %s %s to %d device(s) in %d phase(s)",
        dep.deployment_id,
        p.app,
        dep.version,
        len(devices),
        len(dep.phases),
    )
    return await services.calls.run(_info, services.deployments, dep.deployment_id)


def _plan(
    services: Services, operator: str, p: DeployCreate
) -> tuple[Deployment, list[tuple[str, int, str, str]]]:
    """The deployment and its devices' first rows (statements and pure
    computation only: run off the trio thread, db_calls.py). Raises as
    :func:`deploy_create`."""
    record = pushable_release(services.releases, p.app, p.version, "deployed")
    active = services.deployments.active_for_app(p.app)
    if active is not None:
        raise Conflict(
            f"deployment {active.deployment_id} of {p.app} is {active.state}: "
            f"abort it first (fleetpush deploy abort {active.deployment_id})"
        )
    targets = named_targets(services.devices, p.app, p.devices, p.group, p.all)
    deployment_id = secrets.token_hex(6)
    targets = rollout_order(deployment_id, targets)
    if p.percent < 100:
        targets = targets[: max(1, math.ceil(len(targets) * p.percent / 100 - 1e-9))]
    if not targets:
        raise NotFound("no accepted device matches the deployment's targets")
    try:
        phases = phase_sizes(p.phases, len(targets))
    except PhaseError as e:
        raise BadRequest(f"phases: {e}") from e
    failed_before = (
        {} if p.retry_failed else services.deployments.failed_before(p.app, record.version)
    )
    now = time.time()
    # One query for every target's version, not one per device (10,000 devices).
    rows = {r["device_id"]: r for r in services.devices.list(app=p.app)}
    devices: list[tuple[str, int, str, str]] = []
    phase = 0
    for i, device_id in enumerate(targets):
        while i >= phases[phase]:
            phase += 1
        row = rows[device_id]
        if row["version"] == record.version and row["state"] != "trial":
            devices.append((device_id, phase, "skipped", f"already runs {record.version}"))
        elif device_id in failed_before:
            devices.append(
                (
                    device_id,
                    phase,
                    "skipped",
                    f"failed this release in deployment {failed_before[device_id]} "
                    "(deploy again with --retry-failed to include it)",
                )
            )
        else:
            devices.append((device_id, phase, "pending", ""))
    dep = Deployment(
        deployment_id=deployment_id,
        created=now,
        operator=operator,
        app=p.app,
        version=record.version,
        selector={
            "devices": p.devices,
            "group": p.group,
            "all": p.all,
            "percent": p.percent,
            "phases": p.phases,
        },
        phases=phases,
        phase=0,
        phase_started=now,
        max_concurrent=p.max_concurrent,
        failure_percent=p.halt_after_failures,
        min_executed=p.min_executed,
        on_halt=p.on_halt,
        phase_wait=p.phase_wait,
        device_timeout=p.device_timeout,
        restart=p.restart,
        state="running",
        reason="",
        paused_from=None,
        base_succeeded=0,
        base_failed=0,
    )
    return dep, devices


async def deploy_list(services: Services, call: Call, p: DeployFilter) -> DeployList:
    return await services.calls.run(_list, services.deployments, p)


def _list(store: DeploymentStore, p: DeployFilter) -> DeployList:
    """The database part of ``deploy_list`` (run off the trio thread: db_calls.py)."""
    deps = store.list(app=p.app, states=p.states, limit=p.limit)
    return DeployList(deployments=[d.info(store.counts(d.deployment_id)) for d in deps])


async def deploy_show(services: Services, call: Call, p: DeployShow) -> DeploymentInfo:
    """The deployment and a page of its devices, by rollout order. Raises NotFound, BadRequest.

    Read off the trio thread on PostgreSQL (db_calls.py): a page of 10,000
    devices took 245 ms on the trio thread, with no device served meanwhile.
    """
    after: int | None = None
    if p.after is not None:
        try:
            after = int(p.after)
        except ValueError as e:
            raise BadRequest("deploy_show: after is not a cursor from a previous page") from e
    return await services.calls.run(
        functools.partial(_info, services.deployments, p.deployment_id, after=after, limit=p.limit)
    )


async def deploy_pause(services: Services, call: Call, p: DeployRef) -> DeploymentInfo:
    """Raises NotFound, Conflict."""
    await services.rollouts.pause(p.deployment_id, call.operator or "?")
    return await services.calls.run(_info, services.deployments, p.deployment_id)


async def deploy_resume(services: Services, call: Call, p: DeployRef) -> DeploymentInfo:
    """Raises NotFound, Conflict."""
    await services.rollouts.resume(
        p.deployment_id, call.operator or "?", retry_failed=p.retry_failed
    )
    return await services.calls.run(_info, services.deployments, p.deployment_id)


async def deploy_abort(services: Services, call: Call, p: DeployRef) -> DeploymentInfo:
    """Raises NotFound, Conflict."""
    await services.rollouts.abort(p.deployment_id, call.operator or "?")
    return await services.calls.run(_info, services.deployments, p.deployment_id)


def _info(
    store: DeploymentStore, deployment_id: str, *, after: int | None = None, limit: int = 0
) -> DeploymentInfo:
    """Pure database reads: safe in a worker thread (db_calls.py)."""
    dep = store.require(deployment_id)
    counts = store.counts(deployment_id)
    if not limit:
        return dep.info(counts)
    rows = store.devices(deployment_id, after=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return dep.info(counts, [d for _, d in rows], next=str(rows[-1][0]) if more and rows else None)
