"""The deployment scheduler: one trio task in the releaser (specs/PROTOCOL.md §7.7.1).

It is told everything through the event hub (:meth:`Rollouts.observe`, a
listener: no queue, nothing dropped) and acts through callables passed in
(:class:`Actions`), like ``chunks.send_chunks(cache, jobs, send, finish)``:
it never sees a session, a handler or the Services object.

- A device is *started* by an ordinary push (push_core.py) of the
  deployment's release, so the forced-push machinery is reused: the device
  persists the command before acknowledging it, and the push is re-offered
  on each connection until finished (§7.4). Only devices that are connected
  are started (a start holds one of ``max_concurrent`` slots, and an
  offline device would hold it for nothing): an offline device of an open
  phase is started when it connects (the ``connected`` event wakes the
  scheduler).
- A started device *succeeds* when it reports ``committed`` of the
  deployment's version (the end of its trial, not of the download), and
  *fails* on ``failed`` or ``rolled_back`` of its push (or of no push: a
  trial's outcome names none), on an ``error``/``refused`` answer to the
  command, or when it reports nothing for ``device_timeout`` seconds.
  ``deferred`` (busy, maintenance window) is neither; its next progress
  makes it started again.
- After each outcome the halt rule (rollout_rules.halt_verdict) is
  evaluated before the next outcome is handled and before any device is
  started: no device is started after the outcome that trips it (a success
  can: the one that brings the finished devices up to ``min_executed``).
  Halting is a compare-and-set on the deployment's row (deployments.py), so
  it happens once; the release is then paused or revoked (``on_halt``) and a
  ``deployment`` event says why.
- The task itself (:meth:`Rollouts.run`) wakes on those events, or every
  ``tick`` seconds for the deadlines: it fails silent devices, opens the
  next phase, completes the deployment, and starts devices.

Where the statements run (issue 15, specs/SCALE.md §4.1): every store call
goes through ``run`` (db_calls.DbCalls.run: a worker thread on PostgreSQL,
inline on SQLite); the in-memory state (``_open``, the inbox) and the event
hub's emit are touched on the trio thread only, between those calls. So the
listener (:meth:`Rollouts.observe`, called inside ``emit``) sends nothing: it
files the outcome in an inbox that the scheduler's task handles in order.
The task's rounds and the operator commands take one lock, so they never
interleave at a database call (each was one synchronous step before), and a
round handles the inbox right before it starts devices, with no await
between that and the start, which keeps the order above.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

import attrs
import trio
from fleetpush.protocol import FleetpushError
from fleetpush.protocol.messages import Event

from .deployments import ACTIVE, OPEN_DEVICE, Deployment, DeploymentStore
from .errors import Conflict
from .rollout_rules import Counts, HaltRule, halt_verdict, phase_done, starts_allowed

log = logging.getLogger("fleetpush.server.rollout")

#: Seconds between two rounds when nothing wakes the scheduler (deadlines).
TICK: Final = 1.0

T = TypeVar("T")


class Runner(Protocol):
    """Runs a store call (db_calls.DbCalls.run): ``await run(fn, *args)``."""

    def __call__(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]: ...


async def inline(fn: Callable[..., T], *args: Any) -> T:
    """The runner of a releaser without a pool: the call on the trio thread."""
    return fn(*args)


@attrs.frozen(kw_only=True)
class Actions:
    """What the scheduler may do to the rest of the releaser (built by services.py)."""

    #: push the deployment's release to these connected devices: (push id,
    #: {device: why it was skipped}), or None if the third argument (awaited
    #: last, right before the push: Rollouts._ready) says the deployment no
    #: longer runs; raises FleetpushError if the release cannot be pushed at
    #: all (not pushable, gone)
    start: Callable[
        [Deployment, list[str], Callable[[], Awaitable[bool]]],
        Awaitable[tuple[str, dict[str, str]] | None],
    ]
    #: True if the device is connected and may take a command now
    online: Callable[[str], bool]
    #: set a release's status (app, version, status, operator) -> its previous
    #: status; raises FleetpushError (an illegal transition)
    set_release: Callable[[str, str, str, str], Awaitable[str]]
    #: a release's status (app, version), None if it is gone
    release_status: Callable[[str, str], Awaitable[str | None]]
    #: the event hub's emit (kind, device id, data)
    emit: Callable[[str, str | None, dict[str, Any]], object]


@attrs.define
class _Open:
    """A started or deferred device the scheduler follows."""

    deployment_id: str
    push_id: str
    state: str
    #: when it last reported progress (or was started), ``clock()`` time
    progress: float


class Rollouts:
    """The scheduler and the deployment commands (trio thread only)."""

    def __init__(
        self,
        store: DeploymentStore,
        actions: Actions,
        *,
        run: Runner = inline,
        clock: Callable[[], float] = time.time,
        tick: float = TICK,
    ) -> None:
        self.store = store
        self.actions = actions
        self.run_db = run
        self.clock = clock
        self.tick = tick
        self._open: dict[str, _Open] = {}
        #: outcomes the listener filed for the task (trio thread only); bounded
        #: by the events of followed devices between two rounds
        self._inbox: collections.deque[Event] = collections.deque()
        #: the rounds and the operator commands, one at a time (module docstring)
        self._lock = trio.Lock()
        #: set by lead(True): the task reads the started devices again first
        self._reload = False
        self._wake = trio.Event()
        #: False on a releaser that is not the cluster's leader (cluster_bus.py):
        #: it keeps the commands (rows) but schedules nothing and follows no device
        self.leading = True
        # Before the releaser accepts a connection: no outcome may arrive unfollowed.
        self.load()

    # --- what the releaser calls ------------------------------------------------------

    def load(self) -> None:
        """Follow the started devices again (after a restart; before the
        releaser serves, so on the calling thread).

        Their progress clock restarts now: they had no releaser to report to.
        """
        self._follow(self.store.open_devices())

    def _follow(self, rows: Sequence[tuple[str, str, str, str, float]]) -> None:
        now = self.clock()
        self._open = {device: _Open(dep, push, state, now) for device, dep, push, state, _ in rows}
        self._inbox.clear()

    def wake(self) -> None:
        self._wake.set()

    def lead(self, leading: bool) -> None:
        """Start or stop scheduling (several releasers: only the leader does).

        A new leader follows the started devices again from the rows, as after
        a restart: the old leader's in-memory state died with it.
        """
        self.leading = leading
        if leading:
            # Read by the task through the runner, before its next round.
            self._reload = True
            self.wake()
        else:
            self._reload = False
            self._open = {}
            self._inbox.clear()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Schedule until cancelled."""
        task_status.started()
        while True:
            try:
                if self.leading:
                    await self.step()
            except Exception:
                # One bad round (a database error) must not end every deployment.
                log.exception("a deployment scheduling round failed")
            with trio.move_on_after(self.tick):
                await self._wake.wait()
            self._wake = trio.Event()

    def observe(self, event: Event) -> None:
        """The event hub's listener: outcomes, command answers, connections.

        Sends no statement (it runs inside ``emit``): a followed device's
        outcome is filed for the task (:meth:`_handle`).
        """
        if event.kind == "connected":
            self.wake()
            return
        if not self.leading:
            return
        if event.device_id is None or event.kind not in ("progress", "command_result"):
            return
        if event.device_id in self._open:
            self._inbox.append(event)
            self.wake()

    async def _drain(self) -> None:
        """Handle the filed outcomes in order (the lock held)."""
        if self._reload:
            # Cleared only once read: a failed read is tried again next round.
            rows = await self.run_db(self.store.open_devices)
            if self._reload and self.leading:
                self._reload = False
                self._follow(rows)
        while self._inbox:
            await self._handle(self._inbox.popleft())

    async def _handle(self, event: Event) -> None:
        assert event.device_id is not None
        device = event.device_id
        o = self._open.get(device)
        if o is None:
            return
        data = event.data
        push_id = str(data.get("push_id") or "")
        if push_id and push_id != o.push_id:
            return  # another push's progress (an operator's one-shot push, say)
        if event.kind == "command_result":
            if push_id == o.push_id and data.get("state") in ("refused", "error"):
                await self._finish(device, o, "failed", f"the device refused: {data.get('detail')}")
            return
        state = str(data.get("state") or "")
        error = str(data.get("error") or "")
        dep = await self.run_db(self.store.get, o.deployment_id)
        if dep is None or dep.state not in ACTIVE:
            # Gone, or aborted (perhaps through another releaser): not followed.
            self._open.pop(device, None)
            return
        if state == "committed":
            if str(data.get("version") or "") == dep.version:
                await self._finish(device, o, "succeeded", f"committed {dep.version}")
        elif state in ("rolled_back", "failed"):
            await self._finish(device, o, "failed", f"{state.replace('_', ' ')}: {error or '?'}")
        elif state == "deferred":
            await self._set_open(device, o, "deferred", error or "deferred by the device")
        else:
            o.progress = self.clock()
            if o.state == "deferred":
                await self._set_open(device, o, "started", "")

    # --- operator commands (deploy_api.py) --------------------------------------------

    async def create(self, dep: Deployment, devices: Sequence[tuple[str, int, str, str]]) -> None:
        async with self._lock:
            await self.run_db(self.store.create, dep, devices, self.clock())
        self._emit(dep, "created", operator=dep.operator, targets=len(devices))
        self.wake()

    async def pause(self, deployment_id: str, operator: str) -> Deployment:
        """Raises NotFound, Conflict (not running)."""
        async with self._lock:
            dep, changed = await self.run_db(
                self._set_state, deployment_id, "paused", f"paused by {operator}", ("running",)
            )
        if dep.state == "paused" and not changed:
            return dep
        if not changed:
            raise Conflict(f"deployment {deployment_id} is {dep.state}: only a running one pauses")
        self._emit(dep, "paused", operator=operator)
        return dep

    def _set_state(
        self, deployment_id: str, state: str, reason: str, expect: tuple[str, ...]
    ) -> tuple[Deployment, bool]:
        """The row after a compare-and-set to ``state`` (statements only: run_db).

        Raises NotFound. Changes nothing if the deployment is in ``state``.
        """
        dep = self.store.require(deployment_id)
        if dep.state == state:
            return dep, False
        changed = self.store.set_state(deployment_id, state, reason, self.clock(), expect=expect)
        return self.store.require(deployment_id), changed

    async def resume(self, deployment_id: str, operator: str, *, retry_failed: bool) -> Deployment:
        """Run a paused or halted deployment again. Raises NotFound, Conflict.

        A halted deployment's release is set back to the status the halt paused,
        and its rule counts only the devices that finish from now on (else the
        failures that tripped it would trip it again at once).
        """
        async with self._lock:
            dep = await self._resume(deployment_id, operator, retry_failed=retry_failed)
        self.wake()
        return dep

    async def _resume(self, deployment_id: str, operator: str, *, retry_failed: bool) -> Deployment:
        dep = await self.run_db(self.store.require, deployment_id)
        if dep.state not in ("paused", "halted"):
            if dep.state == "running" and not retry_failed:
                return dep
            if dep.state != "running":
                raise Conflict(
                    f"deployment {deployment_id} is {dep.state}: only a paused or halted "
                    "one resumes (create a new deployment)"
                )
        if dep.paused_from is not None:
            try:
                await self.actions.set_release(dep.app, dep.version, dep.paused_from, operator)
            except FleetpushError as e:
                raise Conflict(f"deployment {deployment_id} cannot resume: {e}") from e
        status = await self.actions.release_status(dep.app, dep.version)
        if status not in ("pre-released", "approved"):
            raise Conflict(
                f"deployment {deployment_id} cannot resume: {dep.app} {dep.version} is "
                f"{status or 'gone'} (deploy a new release instead)"
            )
        resumed = await self.run_db(self._set_running, dep, retry_failed)
        if resumed is None:
            raise Conflict(f"deployment {deployment_id} changed meanwhile: try again")
        self._emit(resumed, "resumed", operator=operator, retry_failed=retry_failed)
        return resumed

    def _set_running(self, dep: Deployment, retry_failed: bool) -> Deployment | None:
        """The database part of resume (statements only: run_db); None if the
        row changed meanwhile."""
        deployment_id = dep.deployment_id
        if retry_failed:
            self.store.retry_failed(deployment_id)
        counts = self.store.counts(deployment_id)
        base = {}
        if dep.state == "halted":
            base = {
                "base_succeeded": counts.get("succeeded", 0),
                "base_failed": counts.get("failed", 0),
                "paused_from": None,
            }
        now = self.clock()
        if not self.store.set_state(deployment_id, "running", "", now, expect=(dep.state,), **base):
            return None
        return self.store.require(deployment_id)

    async def abort(self, deployment_id: str, operator: str) -> Deployment:
        """End it for good: no device is started again. Raises NotFound, Conflict."""
        async with self._lock:
            dep, changed = await self.run_db(
                self._set_state, deployment_id, "aborted", f"aborted by {operator}", ACTIVE
            )
        if dep.state == "aborted" and not changed:
            return dep
        if not changed:
            raise Conflict(f"deployment {deployment_id} is {dep.state}: it cannot be aborted")
        # Its started devices are no longer followed (their rows keep "started").
        for device in [d for d, o in self._open.items() if o.deployment_id == deployment_id]:
            del self._open[device]
        self._emit(dep, "aborted", operator=operator)
        return dep

    # --- the rounds -------------------------------------------------------------------

    async def step(self) -> None:
        """One round over every active deployment (see the module docstring)."""
        async with self._lock:
            await self._drain()
            now = self.clock()
            deps = {d.deployment_id: d for d in await self.run_db(self.store.list, None, ACTIVE)}
            for device, o in list(self._open.items()):
                dep = deps.get(o.deployment_id)
                timeout = dep.device_timeout if dep is not None else 0.0
                if dep is not None and o.state == "started" and now - o.progress > timeout:
                    await self._finish(
                        device, o, "failed", f"no progress for {timeout:g}s (device timeout)"
                    )
            for deployment_id in deps:
                dep = await self.run_db(self.store.get, deployment_id)
                if dep is not None and dep.state == "running":
                    await self._step(dep, now)

    async def _step(self, dep: Deployment, now: float) -> None:
        while True:
            open_devices = await self.run_db(self.store.open_count, dep.deployment_id, dep.phase)
            if not phase_done(
                open_devices=open_devices,
                elapsed=now - dep.phase_started,
                phase_wait=dep.phase_wait,
            ):
                break
            if dep.phase + 1 < len(dep.phases):
                dep = await self.run_db(self._next_phase, dep.deployment_id, dep.phase + 1, now)
                self._emit(dep, "phase", devices=dep.phases[dep.phase])
                continue
            if open_devices == 0:
                done, dep = await self.run_db(
                    self._set_state_at, dep.deployment_id, "completed", "", now, ("running",)
                )
                if done:
                    self._emit(dep, "completed")
                return
            break
        rows = await self.run_db(self.store.pending, dep.deployment_id, dep.phase)
        pending = [d for d in rows if self.actions.online(d)]
        in_progress = sum(
            1
            for o in self._open.values()
            if o.deployment_id == dep.deployment_id and o.state == "started"
        )
        n = starts_allowed(
            pending=len(pending), in_progress=in_progress, max_concurrent=dep.max_concurrent
        )
        if n:
            await self._start(dep, pending[:n], now)

    def _next_phase(self, deployment_id: str, phase: int, now: float) -> Deployment:
        self.store.set_phase(deployment_id, phase, now)
        return self.store.require(deployment_id)

    def _set_state_at(
        self,
        deployment_id: str,
        state: str,
        reason: str,
        now: float,
        expect: tuple[str, ...],
        **fields: Any,
    ) -> tuple[bool, Deployment]:
        """A compare-and-set and the row after it (statements only: run_db)."""
        changed = self.store.set_state(deployment_id, state, reason, now, expect=expect, **fields)
        return changed, self.store.require(deployment_id)

    async def _ready(self, deployment_id: str) -> bool:
        """Handle every filed outcome, then say if ``deployment_id`` still runs.

        ``Actions.start`` awaits it right before its push, with no await
        after: an outcome that trips the halt rule is handled before any
        device is started (module docstring).
        """
        while True:
            await self._drain()
            dep = await self.run_db(self.store.get, deployment_id)
            if not self._inbox:
                return dep is not None and dep.state == "running"

    async def _start(self, dep: Deployment, devices: list[str], now: float) -> None:
        try:
            started_push = await self.actions.start(
                dep, devices, lambda: self._ready(dep.deployment_id)
            )
        except FleetpushError as e:
            # The release cannot be pushed (revoked or paused by hand, say):
            # pause rather than fail every device for it.
            reason = f"cannot start devices: {e}"
            done, paused = await self.run_db(
                self._set_state_at, dep.deployment_id, "paused", reason, now, ("running",)
            )
            if done:
                self._emit(paused, "paused", operator="releaser")
            return
        if started_push is None:
            return  # halted, paused or aborted meanwhile (_ready)
        push_id, skipped = started_push
        started = [d for d in devices if d not in skipped]
        # Followed before the next await: their answers may come at any checkpoint.
        for device in started:
            self._open[device] = _Open(dep.deployment_id, push_id, "started", now)
        for device, why in skipped.items():
            if await self.run_db(
                functools.partial(self.store.set_device, expect=("pending",)),
                dep.deployment_id,
                device,
                "skipped",
                why,
                now,
            ):
                self._emit_device(dep, device, "skipped", why)
        if not started:
            return
        await self.run_db(self.store.mark_started, dep.deployment_id, started, push_id, now)
        for device in started:
            self._emit_device(dep, device, "started", "", push_id=push_id)

    # --- device outcomes ----------------------------------------------------------------

    async def _set_open(self, device: str, o: _Open, state: str, reason: str) -> None:
        o.state = state
        o.progress = self.clock()
        dep = await self.run_db(
            self._set_device, o.deployment_id, device, state, reason, self.clock()
        )
        if dep is not None:
            self._emit_device(dep, device, state, reason)
        self.wake()

    def _set_device(
        self, deployment_id: str, device: str, state: str, reason: str, now: float
    ) -> Deployment | None:
        """An open device's row to ``state`` (compare-and-set) and its deployment;
        None if the row was not open or the deployment is gone (statements only)."""
        if not self.store.set_device(deployment_id, device, state, reason, now, expect=OPEN_DEVICE):
            return None
        return self.store.get(deployment_id)

    async def _finish(self, device: str, o: _Open, state: str, reason: str) -> None:
        self._open.pop(device, None)
        now = self.clock()
        dep = await self.run_db(self._set_device, o.deployment_id, device, state, reason, now)
        if dep is None:
            return
        self._emit_device(dep, device, state, reason)
        if dep.state == "running":
            # After a success too: it may be the one that brings the finished
            # devices up to min_executed, past failures already over the share.
            await self._check_halt(dep, now)
        self.wake()

    async def _check_halt(self, dep: Deployment, now: float) -> None:
        counts = await self.run_db(self.store.counts, dep.deployment_id)
        verdict = halt_verdict(
            HaltRule(failure_percent=dep.failure_percent, min_executed=dep.min_executed),
            Counts(
                succeeded=counts.get("succeeded", 0) - dep.base_succeeded,
                failed=counts.get("failed", 0) - dep.base_failed,
            ),
        )
        if verdict.halt:
            await self._halt(dep, verdict.reason, now)

    async def _halt(self, dep: Deployment, reason: str, now: float) -> None:
        """Halt once (compare-and-set), then pause or revoke the release."""
        status = "paused" if dep.on_halt == "pause" else "revoked"
        halted, _ = await self.run_db(
            self._set_state_at, dep.deployment_id, "halted", reason, now, ("running",)
        )
        if not halted:
            return
        who = f"deployment {dep.deployment_id}"
        release = status
        try:
            previous = await self.actions.set_release(dep.app, dep.version, status, who)
        except FleetpushError as e:
            release = f"not {status}: {e}"
            log.warning("%s halted; its release was %s", who, release)
        else:
            if status == "paused" and previous != "paused":
                await self.run_db(
                    functools.partial(self._set_state_at, paused_from=previous),
                    dep.deployment_id,
                    "halted",
                    reason,
                    now,
                    ("halted",),
                )
        log.warning("%s halted: %s; release %s %s", who, reason, dep.app, release)
        self._emit(
            await self.run_db(self.store.require, dep.deployment_id), "halted", release=release
        )

    # --- events -------------------------------------------------------------------------

    def _emit(self, dep: Deployment, action: str, **extra: Any) -> None:
        self.actions.emit(
            "deployment",
            None,
            {
                "deployment_id": dep.deployment_id,
                "action": action,
                "state": dep.state,
                "app": dep.app,
                "version": dep.version,
                "phase": dep.phase,
                "reason": dep.reason,
                **extra,
            },
        )

    def _emit_device(
        self, dep: Deployment, device: str, state: str, reason: str, **extra: Any
    ) -> None:
        data: dict[str, Any] = {
            "deployment_id": dep.deployment_id,
            "state": state,
            "version": dep.version,
            "reason": reason,
            **extra,
        }
        self.actions.emit("deployment_device", device, data)
