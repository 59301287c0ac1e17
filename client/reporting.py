"""The updater's reports to the releaser: live progress and the outcome history.

Every step is reported live as ``update_progress`` (specs/PROTOCOL.md §7.6).
The outcome of each update (staged, applied, committed, rolled back, failed)
and what recovery repaired are also appended to the persisted history and
sent to the releaser as ``report_outcomes`` (§7.6.1) after each reconnect and
each new entry: an entry leaves the history only once the releaser has
acknowledged its id, which it does after committing it, so a kill of either
side never loses it (issue 10, item 11). Each entry keeps one id for its life
(:func:`report_id`), so a re-sent entry is recognised and ignored. A releaser
that does not know ``report_outcomes`` (METHOD_NOT_FOUND) gets the old
``update_progress`` notifications instead.

:class:`OutcomeReporter` is the :class:`~fleetpush.client.context.Reporter`
the other steps are given: it needs the state store and the releaser link,
never the updater.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio
from fleetpush.protocol.errors import ErrorCode, FleetpushError, RpcError
from fleetpush.protocol.messages import (
    MAX_OUTCOMES,
    Outcome,
    ReportOutcomes,
    ReportOutcomesResult,
    UpdateProgress,
)

from .context import Link, StateStore
from .errors import DiskFullError
from .session import Unreachable
from .state import DeviceState, load_state

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")

#: history event -> update_progress state (events of state.py plus ours).
_EVENT_STATES: Final = {
    "staged": "staged",
    "applied": "trial",
    "committed": "committed",
    "rolled-back": "rolled_back",
    "failed": "failed",
    "apply-failed": "failed",
    "apply-interrupted": "failed",
    "rollback-failed": "failed",
}

#: The steps of a check: while a trial runs they do not replace its state.
_CHECK_STATES: Final = ("checking", "up_to_date", "idle")

#: How long the releaser has to commit and acknowledge one ``report_outcomes``.
REPORT_TIMEOUT: Final = 10.0


def result_doc(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """A history entry as a ``last_result``: ``{state, version, error, time}``.

    The releaser's ``DeviceInfo.last_result`` is the same object (server
    registry.py, specs/PROTOCOL.md §7.9), with the state named as the
    releaser names it (``rolled_back``, not the history's ``rolled-back``).
    """
    if entry is None:
        return None
    event = str(entry.get("state") or "")
    when = entry.get("time")
    error = entry.get("error")
    return {
        "state": _EVENT_STATES.get(event, event),
        "version": entry.get("version") or None,
        "error": None if error is None else str(error),
        "time": round(when, 3) if isinstance(when, (int, float)) else None,
    }


def report_id(entry: dict[str, Any]) -> str:
    """The stable id of a history entry: its ``id``, else a digest of the entry.

    An entry is never changed once persisted, so the digest is the same each
    time it is sent (entries written before ids existed included).
    """
    given = entry.get("id")
    if isinstance(given, str) and given:
        return given[:64]
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class OutcomeReporter:
    """Progress notifications and the persisted history of one device's updater."""

    def __init__(
        self,
        app: str,
        store: StateStore,
        link: Link,
        on_progress: Callable[[UpdateProgress], object] | None = None,
    ) -> None:
        self._app = app
        self._store = store
        self._link = link
        self._on_progress = on_progress
        #: the last progress state reported.
        self.phase = "idle"
        #: set to make the flusher send the history; replaced after each wake-up.
        self.wake = trio.Event()
        #: the trio loop the updater runs in, to wake the flusher from other threads.
        self.trio_token: trio.lowlevel.TrioToken | None = None

    async def progress(
        self,
        state: str,
        version: str = "",
        *,
        push_id: str = "",
        done: int = 0,
        total: int = 0,
        error: str | None = None,
        check: bool = False,
    ) -> None:
        """Report a step: the on_progress hook, the log, and ``update_progress``.

        During a trial, a periodic check's steps (``checking``, ``up_to_date``,
        ``idle``, and a check that failed: ``check``) are not the device's
        state: the version on trial still is. They are logged and not sent, or
        the releaser would show ``up_to_date`` or ``failed`` for a device whose
        trial has not ended (issue 11, item 6).
        """
        if (state in _CHECK_STATES or check) and self._store.state.trial is not None:
            log.log(
                logging.WARNING if state == "failed" else logging.DEBUG,
                "update %s during the trial of %s: not reported%s",
                state,
                self._store.state.trial.version,
                f" ({error})" if error else "",
            )
            return
        msg = UpdateProgress(
            state=state,
            app=self._app,
            version=version,
            push_id=push_id,
            bytes_done=done,
            bytes_total=total,
            error=error,
        )
        if state != self.phase or state != "downloading":
            log.info(
                "update %s%s%s",
                state,
                f" {version}" if version else "",
                f": {error}" if error else "",
            )
        self.phase = state
        if self._on_progress is not None:
            try:
                self._on_progress(msg)
            except Exception:
                log.exception("on_progress hook failed")
        await self._link.notify("update_progress", msg)

    async def record(
        self, event: str, version: str | None, error: str | None = None, push_id: str = ""
    ) -> None:
        """Persist an outcome in the history and get it to the releaser (now or later)."""
        now = time.time()

        def change(s: DeviceState) -> DeviceState:
            s = s.record(now, event, version, error)
            if push_id:
                entry = {**s.history[-1], "push_id": push_id}
                s = attrs.evolve(s, history=(*s.history[:-1], entry), last_result=entry)
            return s

        try:
            await self._store.change(change)
        except DiskFullError as e:
            # Reporting an outcome must not replace the error being reported
            # (typically the disk-full download itself); the live
            # update_progress already told the releaser, only the durable copy
            # for a later re-send is lost.
            log.warning("could not persist %s %s in the history: %s", event, version or "", e)
            return
        self.wake.set()

    async def flush_history(self) -> None:
        """Send every persisted outcome the releaser has not acknowledged yet.

        Entries are deleted only once acknowledged; the rest stay for the next
        flush. Never raises for the link (Unreachable, an RPC error): logged.
        Raises StateError/FilesystemError from the state file.
        """
        state = await trio.to_thread.run_sync(load_state, self._store.state_dir)
        if not state.history:
            return
        entries = [(report_id(e), e) for e in state.history]
        try:
            done = await self._report(entries)
        except RpcError as e:
            if e.code != ErrorCode.METHOD_NOT_FOUND:
                log.info("history flush: the releaser did not take it: %s", e)
                return
            done = await self._notify(entries)  # an older releaser (§7.6.1)
        except Unreachable as e:
            log.info("history flush: %s", e)
            return
        if done:
            await self._store.change(
                lambda s: attrs.evolve(
                    s, history=tuple(h for h in s.history if report_id(h) not in done)
                )
            )

    async def _report(self, entries: list[tuple[str, dict[str, Any]]]) -> set[str]:
        """``report_outcomes``: the ids the releaser acknowledged (committed).

        Raises Unreachable, RpcError.
        """
        done: set[str] = set()
        for start in range(0, len(entries), MAX_OUTCOMES):
            batch = [
                Outcome(
                    report_id=rid,
                    event=str(e.get("state"))[:64],
                    time=float(e.get("time") or 0.0),
                    state=_EVENT_STATES.get(str(e.get("state")), ""),
                    app=self._app,
                    version=str(e.get("version") or ""),
                    push_id=str(e.get("push_id") or ""),
                    error=None if e.get("error") is None else str(e.get("error")),
                )
                for rid, e in entries[start : start + MAX_OUTCOMES]
            ]
            result = await self._link.request(
                "report_outcomes", ReportOutcomes(reports=batch), REPORT_TIMEOUT
            )
            if isinstance(result, ReportOutcomesResult):
                done.update(result.acknowledged)
        return done

    async def _notify(self, entries: list[tuple[str, dict[str, Any]]]) -> set[str]:
        """The old way: one ``update_progress`` each, deleted once written (not durable)."""
        sent: set[str] = set()
        for rid, entry in entries:
            pstate = _EVENT_STATES.get(str(entry.get("state")))
            if pstate is None:
                sent.add(rid)  # an old releaser has nowhere to put it
                continue
            msg = UpdateProgress(
                state=pstate,
                app=self._app,
                version=str(entry.get("version") or ""),
                push_id=str(entry.get("push_id") or ""),
                error=entry.get("error"),
            )
            if not await self._link.notify("update_progress", msg):
                break
            sent.add(rid)
        return sent

    async def flusher(self) -> None:
        """Flush the history whenever woken while connected; runs until cancelled."""
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            if self._link.connected:
                try:
                    await self.flush_history()
                except FleetpushError as e:
                    log.info("history flush: %s", e)

    def poke(self) -> None:
        """Wake the history flusher from the trio thread or from any other thread."""
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            token = self.trio_token
            if token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self.wake.set, trio_token=token)
        else:
            self.wake.set()
