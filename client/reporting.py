"""The updater's reports to the releaser: live progress and the outcome history.

Every step is reported live as ``update_progress`` (specs/PROTOCOL.md §7.6).
The outcome of each update (staged, applied, committed, rolled back, failed)
is also appended to the persisted history and flushed to the releaser after
each reconnect, so a kill or a re-exec never loses it: an entry leaves the
history only once the releaser has taken the notification.

:class:`OutcomeReporter` is the :class:`~fleetpush.client.context.Reporter`
the other steps are given: it needs the state store and the releaser link,
never the updater.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio
from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.messages import UpdateProgress

from .context import Link, StateStore
from .errors import DiskFullError
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
    ) -> None:
        """Report a step: the on_progress hook, the log, and ``update_progress``."""
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
        """Send every persisted outcome the releaser has not acknowledged yet."""
        state = await trio.to_thread.run_sync(load_state, self._store.state_dir)
        sent: list[dict[str, Any]] = []
        for entry in state.history:
            pstate = _EVENT_STATES.get(str(entry.get("state")))
            if pstate is None:
                sent.append(entry)
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
            sent.append(entry)
        if sent:
            await self._store.change(
                lambda s: attrs.evolve(s, history=tuple(h for h in s.history if h not in sent))
            )

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
