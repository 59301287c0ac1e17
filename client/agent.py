"""``fleetpush agent``: supervise the app as a child process and update it.

The agent runs the app command as a child and keeps it running: start, stop
(SIGTERM, then SIGKILL after ``stop_timeout``), restart, and auto-restart with
capped exponential backoff when it dies. Every child is waited for, so no
zombie is ever left. The child leads its own process group, is recorded
in the state dir and has a parent-death guard, so a kill -9 of the agent
leaves no app behind (child_record.py; a starting agent stops one a
previous agent left). Its status (``starting | running | stopping | stopped |
error``, pid, uptime, last exit code or error, last log lines) is reported to
the releaser as ``app_status`` on each change and every ``status_interval``.

Updates go through the same :class:`Updater` as embedded apps, with the agent
as its :class:`Host`: a staged update is applied *between stopping and
starting the child* (in-process install engine, no re-exec needed since the
agent's own code does not change). The new version is then on trial:

* each start is counted first (``trial.begin_start``): a version that keeps
  dying is rolled back after ``max_attempts`` starts;
* a crash of the child during the trial rolls back at once;
* it is committed when the health command passes or when it has survived
  ``confirm_after`` seconds; at the trial deadline a child that ran the whole
  trial is kept unless a configured health command never passed. The rule
  and the loop are the embedded updater's (trial_watch.py explains it); the
  agent's only difference is that it can witness its own child's liveness:
  a health pass counts only while that same child is alive, and only once
  passes have lasted ``health_interval`` (a stranger on the app's port may
  answer a probe while the child is still starting, then dies on bind).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any, Final, TypeVar

import trio
from fleetpush.protocol import codec
from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.messages import MAX_LOG_LINE, AppStatus

from .app_remote import QUEUE_LINES
from .child_record import (
    forget_child,
    guard_command,
    record_child,
    signal_group,
    stop_leftover,
)
from .config import UpdaterConfig
from .context import UpdateContext
from .data_settings import DataSettings
from .env_step import prepare_env
from .errors import UpdaterError
from .fsutil import atomic_write_json
from .install import apply_staged, give_up, schema_refusal
from .layout import StateLayout
from .local import SOCKET_ENV, VERSION_ENV
from .owner import OwnerLock
from .pyenv import child_env, current_env, expand_command
from .updater import Updater

log = logging.getLogger("fleetpush.client.agent")

T = TypeVar("T")

#: Written in the state dir for ``fleetpush status`` (JSON of AppStatus).
STATUS_FILE: Final = "agent-status.json"

#: A child that ran this long resets the restart backoff.
STABLE_RUN: Final = 10.0


class AgentHost:
    """The Updater's host under the agent: apply between stop and start."""

    supervises = True

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def apply(self, ctx: UpdateContext, version: str) -> None:
        agent = self.agent
        cfg = ctx.config
        # Before anything stops: a release whose env cannot be built leaves
        # the running version alone (env_step.py, issue 12).
        if not await prepare_env(ctx, version):
            return
        async with agent.lock:
            # Before anything stops: a release that cannot run on this data
            # is refused with the app untouched (issue 12; schema.py).
            refused = await trio.to_thread.run_sync(schema_refusal, cfg.state_dir, version)
            if refused is not None:
                log.warning("%s refused: %s", version, refused)
                # Not retried until pushed again; through the store, whose
                # writes are serialised with the history flusher's.
                await ctx.store.change(lambda s: give_up(s, version))
                await ctx.reporter.progress("failed", version, error=refused)
                await ctx.reporter.record("failed", version, refused)
                return
            was_running = agent.proc is not None
            if was_running:
                await ctx.reporter.progress("stopping", version)
            await agent.stop_locked()
            token = trio.lowlevel.current_trio_token()

            def step(name: str) -> None:  # the install engine's steps, from its thread
                trio.from_thread.run(
                    partial(ctx.reporter.progress, name, version), trio_token=token
                )

            try:
                result = await trio.to_thread.run_sync(
                    lambda: apply_staged(
                        cfg.state_dir,
                        cfg.app_root,
                        version,
                        time.time(),
                        trial_seconds=cfg.trial_seconds,
                        data=DataSettings.of(cfg),
                        on_step=step,
                    )
                )
            except UpdaterError as e:
                await ctx.reporter.progress("failed", version, error=f"apply: {e}")
                await ctx.reporter.record("failed", version, f"apply: {e}")
                ctx.store.reload()
            else:
                ctx.store.reload()
                log.info("%s installed (changed: %s)", version, result.changed)
            if was_running or agent.started_once:
                await ctx.reporter.progress("starting", ctx.store.state.installed_version or "")
                await agent.start_locked()

    async def restart_after_rollback(self, ctx: UpdateContext) -> None:
        async with self.agent.lock:
            await self.agent.stop_locked()
            await self.agent.start_locked()


class Agent:
    """Supervises one app command (see the module docstring)."""

    def __init__(
        self, config: UpdaterConfig, command: list[str] | None = None, **hooks: object
    ) -> None:
        cmd = command or list(config.command or ())
        if not cmd:
            raise UpdaterError("no app command: give one after -- or set command in agent.toml")
        self.config = config
        self.command = cmd
        self.lock = trio.Lock()
        self.proc: trio.Process | None = None
        self.state = "stopped"
        self.started_at: float | None = None
        self.exit_code: int | None = None
        self.error: str | None = None
        self.log_tail: deque[str] = deque(maxlen=config.log_lines)
        self.started_once = False
        self.stopping = False
        self.restarts = 0
        self._expected_exit = False
        self._generation = 0
        self._nursery: trio.Nursery | None = None
        #: the parent-death guard of the running child (child_record.py).
        self._guard: trio.Process | None = None
        self._record = StateLayout.of(config.state_dir).child_record
        self._status_changed = trio.Event()
        #: followers of the app's output (``fleetpush logs --follow``, app_remote.py)
        self._log_followers: set[_LogFollow] = set()
        self.updater = Updater(
            config, host=AgentHost(self), app=self, **hooks  # type: ignore[arg-type]
        )

    # --- status ---------------------------------------------------------------------

    def _set(self, state: str, error: str | None = None) -> None:
        if state != self.state or error:
            log.info("app %s%s", state, f": {error}" if error else "")
        self.state = state
        if error is not None:
            self.error = error
        self._status_changed.set()

    def status(self) -> AppStatus:
        uptime = time.monotonic() - self.started_at if self.proc and self.started_at else 0.0
        return AppStatus(
            state=self.state,
            pid=self.proc.pid if self.proc else None,
            uptime=uptime,
            exit_code=self.exit_code,
            error=self.error,
            log_tail=list(self.log_tail)[-20:],
        )

    async def _report_status(self) -> None:
        """app_status to the releaser, and ``<state>/agent-status.json`` for
        ``fleetpush status``, on every change and every ``status_interval``."""
        path = self.config.state_dir / STATUS_FILE
        while True:
            status = self.status()
            doc = {**codec.to_wire(status), "time": time.time(), "command": self.command}
            try:
                await trio.to_thread.run_sync(atomic_write_json, path, doc)
            except UpdaterError as e:
                log.debug("cannot write %s: %s", path, e)
            await self.updater.session.notify("app_status", status)
            with trio.move_on_after(self.config.status_interval):
                await self._status_changed.wait()
            self._status_changed = trio.Event()

    # --- the child ------------------------------------------------------------------

    async def start_locked(self) -> None:
        """Start the app (caller holds ``lock``); counts a trial start first."""
        if self.proc is not None or self.stopping:
            return
        verdict = await self.updater.trial.begin_start()
        self._set("starting")
        cwd = str(self.config.cwd or self.config.app_root)
        # The installed release's env, resolved now: the child keeps its path
        # even if envs/current moves on while it runs (pyenv.py).
        venv = current_env(StateLayout.of(self.config.state_dir))
        try:
            proc = await trio.lowlevel.open_process(
                expand_command(self.command, venv),
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own group: one killpg reaches what it spawns (child_record.py).
                start_new_session=True,
                env=child_env(self._child_env(), venv),
            )
        except OSError as e:
            self._set("error", f"cannot start {self.command[0]}: {e.strerror or e}")
            assert self._nursery is not None
            self._nursery.start_soon(self._restart_later, "start failed")
            return
        self.proc = proc
        await self._record_child(proc)
        self.started_once = True
        self.started_at = time.monotonic()
        self._expected_exit = False
        self._generation += 1
        self.exit_code = None
        self.error = None
        self._set("running")
        assert self._nursery is not None
        self._nursery.start_soon(self._pump_logs, proc)
        self._nursery.start_soon(self._watch_child, proc, self._generation)
        if verdict == "on-trial":
            self._nursery.start_soon(self._watch_trial, self._generation)

    async def stop_locked(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; always reaps the child."""
        proc = self.proc
        if proc is None:
            return
        self._expected_exit = True
        self._set("stopping")
        if proc.returncode is None:
            # The whole group (start_new_session): what the app spawned stops too.
            signal_group(proc.pid, signal.SIGTERM)
            with trio.move_on_after(self.config.stop_timeout):
                await proc.wait()
            if proc.returncode is None:
                log.warning("app did not stop within %gs: SIGKILL", self.config.stop_timeout)
                signal_group(proc.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await proc.wait()
            await self._release_child(proc)
        self.exit_code = proc.returncode
        self.proc = None
        self.started_at = None
        self._set("stopped")

    async def start(self) -> None:
        async with self.lock:
            self.stopping = False
            await self.start_locked()

    async def stop(self) -> None:
        async with self.lock:
            self.stopping = True
            await self.stop_locked()

    async def restart(self) -> None:
        async with self.lock:
            await self.stop_locked()
            self.stopping = False
            await self.start_locked()

    # --- the control socket's view (device_ops.AppControl) ---------------------------

    def _child_env(self) -> dict[str, str]:
        """The app's environment: ours, and what lets it see updates (issue 11)."""
        return {
            **os.environ,
            VERSION_ENV: self.updater.installed_version or "",
            SOCKET_ENV: str(StateLayout.of(self.config.state_dir).control_socket),
        }

    async def while_stopped(self, work: Callable[[], Awaitable[T]]) -> T:
        """Stop the child, run ``work`` (a rollback), start the child again."""
        async with self.lock:
            await self.stop_locked()
            try:
                return await work()
            finally:
                if not self.stopping:
                    await self.start_locked()

    # --- the releaser's view (app_remote.SupervisedApp) ------------------------------

    async def control(self, action: str) -> AppStatus:
        """An operator's ``fleetpush app start|stop|restart``, through the releaser."""
        if action == "start":
            await self.start()
        elif action == "stop":
            await self.stop()
        else:
            await self.restart()
        return self.status()

    def log_lines(self, count: int) -> list[str]:
        return list(self.log_tail)[-count:] if count > 0 else []

    @contextlib.contextmanager
    def follow_logs(self) -> Iterator[_LogFollow]:
        follower = _LogFollow()
        self._log_followers.add(follower)
        try:
            yield follower
        finally:
            self._log_followers.discard(follower)
            follower.send.close()

    def describe(self) -> dict[str, Any]:
        status = self.status()
        return {
            "app_state": status.state,
            "pid": status.pid,
            "uptime": round(status.uptime, 3),
            "restarts": self.restarts,
        }

    async def _record_child(self, proc: trio.Process) -> None:
        """Record the new child and start its parent-death guard (child_record.py).

        A record that cannot be written is logged, not fatal: the app runs,
        only a kill -9 of this agent would then leave it behind.
        """
        try:
            rec = await trio.to_thread.run_sync(
                record_child, self._record, proc.pid, tuple(self.command)
            )
        except UpdaterError as e:
            log.warning("cannot record the app child: %s", e)
            return
        if rec is None:
            return  # already gone: _watch_child sees the exit
        try:
            self._guard = await trio.lowlevel.open_process(
                guard_command(rec, self.config.stop_timeout),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # no terminal signal reaches it
            )
        except OSError as e:
            log.warning("cannot start the parent-death guard: %s", e.strerror or e)

    async def _release_child(self, proc: trio.Process) -> None:
        """After the child was reaped: its group's stragglers, its guard, its record."""
        # The group id cannot be reused while stragglers remain in it, so this
        # reaches only what the app left behind (or nothing).
        signal_group(proc.pid, signal.SIGKILL)
        guard, self._guard = self._guard, None
        if guard is not None:
            # Killed before it can read EOF: a guard acts only when the agent dies.
            with _suppress_lookup():
                guard.kill()
            await guard.wait()
            if guard.stdin is not None:
                await guard.stdin.aclose()
        forget_child(self._record)

    async def _pump_logs(self, proc: trio.Process) -> None:
        assert proc.stdout is not None
        buf = b""
        async with proc.stdout:
            while True:
                try:
                    data = await proc.stdout.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                with _suppress_lookup():
                    sys.stdout.buffer.write(data)
                    sys.stdout.buffer.flush()
                buf += data
                *lines, buf = buf.split(b"\n")
                text = [line.decode(errors="replace")[:MAX_LOG_LINE] for line in lines]
                self.log_tail.extend(text)
                for follower in self._log_followers:
                    follower.offer(text)
                buf = buf[-4096:]

    async def _watch_child(self, proc: trio.Process, generation: int) -> None:
        code = await proc.wait()
        if self._expected_exit or generation != self._generation:
            return
        with trio.CancelScope(shield=True):
            await self._release_child(proc)
        ran = time.monotonic() - (self.started_at or time.monotonic())
        async with self.lock:
            if self.proc is not proc:
                return
            self.proc = None
            self.started_at = None
            self.exit_code = code
            self._set("error", f"exited with code {code}")
            trial = self.updater.trial
            if trial.deadline(self.updater.store.reload()) is not None:
                try:
                    await trial.roll_back(f"the new version exited with code {code}")
                except FleetpushError as e:
                    log.error("rollback failed: %s", e)
                await self.start_locked()
                return
        if ran >= STABLE_RUN:
            self.restarts = 0
        await self._restart_later(f"exit code {code}")

    async def _restart_later(self, why: str) -> None:
        cfg = self.config
        delay = min(
            cfg.restart_backoff_max, cfg.restart_backoff_initial * 2 ** min(self.restarts, 20)
        )
        self.restarts += 1
        log.info("restarting the app in %.1fs (%s)", delay, why)
        await trio.sleep(delay)
        async with self.lock:
            if self.proc is None and not self.stopping:
                await self.start_locked()

    def _current(self, generation: int) -> bool:
        """The child of ``generation`` is still the one running."""
        return (
            generation == self._generation
            and self.proc is not None
            and self.proc.returncode is None
        )

    async def _watch_trial(self, generation: int) -> None:
        """The trial of the child of ``generation``: the updater's one trial loop
        (trial_watch.py), with this child's liveness and a rollback that stops
        and restarts it. A crash is handled by :meth:`_watch_child`."""
        try:
            await self.updater.trial.watch(
                watching=partial(self._current, generation),
                roll_back=partial(self._roll_back_child, generation),
            )
        except FleetpushError as e:
            log.error("trial: %s", e)

    async def _roll_back_child(self, generation: int, reason: str) -> str:
        """Stop the child on trial, roll its version back, start the restored one."""
        async with self.lock:
            if not self._current(generation):
                return "ended"
            await self.stop_locked()
            try:
                return await self.updater.trial.roll_back(reason)
            finally:
                await self.start_locked()  # the restored version (it reports rolled_back)

    # --- running ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the updater and the app; run until cancelled, then stop the app.

        Raises OwnerBusy (another agent or command owns the state dir).
        """
        # One owner (issue 11), taken before anything else: a second agent must
        # not touch the first's child (stop_leftover below) nor its releaser
        # session. Released only once our child is stopped.
        owner = OwnerLock.acquire(StateLayout.of(self.config.state_dir), "agent")
        self.updater.owner = owner
        self.updater.app_control = self
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                cfg = self.config
                if cfg.confirm_after is None and not cfg.health_command:
                    log.info(
                        "no confirm_after or health_command: a new version is kept once "
                        "its app has run for its whole %gs trial without exiting",
                        cfg.trial_seconds,
                    )
                # Before anything else may start a child (a staged update does):
                # the app a kill -9ed agent left behind holds the app's port.
                found = await stop_leftover(self._record, cfg.stop_timeout)
                if found is not None:
                    log.info("agent: %s", found)
                await nursery.start(self.updater.run)
                nursery.start_soon(self._report_status)
                await self.start()
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                self.stopping = True
                await self.stop_locked()
            self.updater.owner = None
            owner.release()


class _LogFollow:
    """New output lines for one follower; a full queue drops lines and counts them."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[str](QUEUE_LINES)
        self.dropped = 0

    def offer(self, lines: list[str]) -> None:
        for line in lines:
            try:
                self.send.send_nowait(line)
            except trio.WouldBlock:
                self.dropped += 1
            except trio.ClosedResourceError:
                return

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped


class _suppress_lookup:
    """Ignore ProcessLookupError / OSError from a child already gone."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: object, e: object, tb: object) -> bool:
        return isinstance(e, OSError)


async def run_agent(config: UpdaterConfig, command: list[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns an exit code (the CLI's entry point)."""
    agent = Agent(config, command)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            async for signum in signals:
                log.info("agent: %s received, stopping the app", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return 0


__all__ = ["Agent", "AgentHost", "run_agent"]
