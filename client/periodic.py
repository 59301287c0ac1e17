"""Periodic checks: on or off, their interval, and the loop that runs them.

Each periodic check is a whole ``update`` (check, stage, apply when allowed),
so ``auto_check = true`` installs what it finds. The releaser's pushes do not
depend on this loop. It is given the updater's ``update`` and a "busy" test as
callables, never the updater (STYLE.md §8).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from fleetpush.protocol.errors import FleetpushError

from .errors import UpdateRefused

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")


class PeriodicChecks:
    """The periodic-check switch and interval, changeable at run time, and their loop."""

    def __init__(
        self,
        *,
        enabled: bool,
        interval: float,
        update: Callable[[], Awaitable[object]],
        busy: Callable[[], bool],
    ) -> None:
        self.enabled = enabled
        self.interval = interval
        self._update = update
        self._busy = busy  # an update already under way: this round is skipped
        self._wake = trio.Event()

    def configure(self, enabled: bool, interval: float | None = None) -> None:
        """Switch checks on or off, or change their interval; the loop notices at once.

        Raises ValueError if ``interval`` is not positive.
        """
        self.enabled = enabled
        if interval is not None:
            if interval <= 0:
                raise ValueError("interval must be positive")
            self.interval = interval
        self._wake.set()

    def check_soon(self) -> None:
        """Check now if checks are on (on each connect: the releaser may have news)."""
        if self.enabled:
            self._wake.set()

    async def run(self) -> None:
        """Check every ``interval`` while on, until cancelled; failures are only logged."""
        while True:
            self._wake = trio.Event()
            with trio.move_on_after(self.interval if self.enabled else 1e9):
                await self._wake.wait()
                if not self.enabled:
                    continue
                await trio.sleep(0)  # coalesce wake-ups
            if not self.enabled or self._busy():
                continue
            try:
                await self._update()
            except UpdateRefused:
                pass
            except (FleetpushError, trio.TooSlowError) as e:
                log.info("periodic check: %s", e)


__all__ = ["PeriodicChecks"]
