"""The updater for apps that are not trio: its own trio loop in a daemon thread.

``handle = Updater(config).start_in_thread()`` runs :meth:`Updater.run` in a
thread; the handle's methods are thread-safe and block until done.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import trio

from .errors import UpdaterError
from .update_check import UpdateInfo

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")


class Runnable(Protocol):
    """What a :class:`ThreadHandle` runs: the Updater's public face (declared
    here so that this module does not import updater.py, which imports it)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    async def check(self, *, timeout: float | None = None) -> UpdateInfo: ...

    async def update(self) -> UpdateInfo: ...

    def confirm(self) -> None: ...

    def set_auto_check(self, enabled: bool, interval: float | None = None) -> None: ...

    def enable_auto_update(self) -> None: ...

    def disable_auto_update(self) -> None: ...

    def set_check_interval(self, seconds: float) -> None: ...

    def status(self) -> dict[str, Any]: ...


class ThreadHandle:
    """An :class:`Updater` running in its own thread; methods are thread-safe."""

    def __init__(self, updater: Runnable) -> None:
        self.updater = updater
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="fleetpush-updater", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._cancel = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.updater.run)
                    self._ready.set()

        try:
            trio.run(main)
        except BaseException as e:
            self.error = e
            log.exception("updater thread ended")
        finally:
            self._ready.set()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._token is None:
            raise UpdaterError("the updater thread is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def check(self) -> UpdateInfo:
        result: UpdateInfo = self._call(self.updater.check)
        return result

    def update(self) -> UpdateInfo:
        result: UpdateInfo = self._call(self.updater.update)
        return result

    def confirm(self) -> None:
        self.updater.confirm()

    def _call_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the updater's trio thread (its state is that thread's)."""
        if self._token is None:
            raise UpdaterError("the updater thread is not running")
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def set_auto_check(self, enabled: bool, interval: float | None = None) -> None:
        """Raises ValueError if ``interval`` is not positive, UpdaterError if not running."""
        self._call_sync(self.updater.set_auto_check, enabled, interval)

    def enable_auto_update(self) -> None:
        """Periodic checks (and the updates they find) on. Raises UpdaterError if not running."""
        self._call_sync(self.updater.enable_auto_update)

    def disable_auto_update(self) -> None:
        """Periodic checks off. Raises UpdaterError if not running."""
        self._call_sync(self.updater.disable_auto_update)

    def set_check_interval(self, seconds: float) -> None:
        """Raises ValueError if ``seconds`` is not positive, UpdaterError if not running."""
        self._call_sync(self.updater.set_check_interval, seconds)

    def status(self) -> dict[str, Any]:
        return self.updater.status()

    def stop(self, timeout: float = 5.0) -> None:
        if self._token is not None and self._cancel is not None:
            scope = self._cancel
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
        self.thread.join(timeout)
