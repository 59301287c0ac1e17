"""Garbage-collector policy for the releaser: keep full collections out of pushes.

With 1000 devices connected the releaser holds a few hundred thousand
long-lived objects (each session's peer, Connection, tasks, cancel scopes).
CPython's default policy runs a full collection over all of them (70-160 ms,
measured at 1000 devices) whenever a quarter as many objects again have
survived into the oldest generation, so in practice every few pushes, in the
middle of one; young collections at the default threshold of 700 added
another ~35 ms per push. Measured with the push bench (1000 devices, 5
pushes; wall time spent in the collector inside the push windows): 282 ms by
default (one 101 ms full collection), 160 ms with the sessions frozen, 83 ms
with the larger young threshold alone, 60 ms with this policy (5 young
collections, no full one); releaser CPU per push fell by about a third.

The policy, once :func:`install`-ed:

- freezes what exists at startup (modules, classes, config: never garbage);
- raises the young-generation threshold (:data:`YOUNG_THRESHOLD`), so
  short-lived objects of a push mostly die by reference counting before a
  collection looks at them;
- as devices connect, collects and freezes the new sessions' objects in
  batches (:func:`connection_opened`): a freeze takes them out of every later
  collection, and collecting only what is not frozen yet is cheap;
- frozen objects are never collected, so cycles left by closed sessions would
  accumulate: once closed sessions reach a quarter of those frozen
  (:func:`connection_closed`), everything is unfrozen, collected once and
  frozen again. That is CPython's own 25% rule, counted in sessions, run at a
  disconnect instead of at whichever allocation of a push crosses it.

Freed memory goes back to the system (:meth:`GcPolicy.trim`): after a burst
of large messages (an 8 MiB ``app_status``, a fuzzer's hostile frames) glibc
keeps the freed heap pages (5 MB of them 5 s after a 60 s live fuzz
campaign, issue 10). ``malloc_trim(0)`` returns them; it runs off the trio
thread, at most every :data:`TRIM_INTERVAL` seconds and only after
connections closed (that is when large buffers die). Services.trim_loop
empties SQLite's page cache just before. What ``malloc_trim`` cannot return
is CPython's own small-object arenas, freed only when all their pools are
empty: those were pinned after peaks of decoded small containers, now kept
low by the releaser's container budget (MAX_SERVER_CONTAINERS).

Without :func:`install` the hooks do nothing (tests, embedding).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterator
from typing import Final

#: Young-generation threshold (CPython's default is 700).
YOUNG_THRESHOLD: Final = 10_000
#: Sessions opened (or closed) before a freeze (or a full collection) is considered.
MIN_BATCH: Final = 64
#: Seconds between two returns of freed heap memory to the system (:meth:`GcPolicy.trim`).
TRIM_INTERVAL: Final = 5.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


class GcPolicy:
    def __init__(self) -> None:
        self.installed = False
        self.frozen_sessions = 0  # sessions whose objects the last freeze covered
        self.opened = 0  # sessions opened since the last freeze
        self.closed = 0  # sessions closed since the last full collection
        self.closed_since_trim = 0
        self.last_trim = float("-inf")
        self._trim = _malloc_trim()

    def install(self) -> None:
        gc.collect()
        gc.freeze()
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
        self.installed = True

    def connection_opened(self) -> None:
        if not self.installed:
            return
        self.opened += 1
        if self.opened >= max(MIN_BATCH, self.frozen_sessions // 4):
            gc.collect()  # frozen objects are skipped: this walks only the new ones
            gc.freeze()
            self.frozen_sessions += self.opened
            self.opened = 0

    def connection_closed(self) -> None:
        if not self.installed:
            return
        self.closed += 1
        self.closed_since_trim += 1
        if self.closed >= max(MIN_BATCH, self.frozen_sessions // 4):
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.frozen_sessions = max(0, self.frozen_sessions + self.opened - self.closed)
            self.opened = self.closed = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No automatic collection inside the block (a push's synchronous fan-out).

        Handing a push to 20,000 links allocates a task and its frames per
        link in one go; the young collections it triggers also age the
        sessions not frozen yet, and the older collections that follow
        walk them, so the fan-out grew faster than the fleet (issue 15, py-spy:
        measured 36 us per device at 5,000, 290 us at 19,500). What the block
        allocates is collected after it, as usual.
        """
        if not self.installed or not gc.isenabled():
            yield
            return
        gc.disable()
        try:
            yield
        finally:
            gc.enable()

    def trim_due(self, now: float) -> bool:
        """True when :meth:`trim` should run (installed, connections closed, not too soon)."""
        return (
            self.installed
            and self._trim is not None
            and self.closed_since_trim > 0
            and now - self.last_trim >= TRIM_INTERVAL
        )

    def trim(self, now: float) -> None:
        """Give freed heap pages back to the system (thread-safe: glibc locks its arenas)."""
        self.last_trim = now
        self.closed_since_trim = 0
        if self._trim is not None:
            self._trim(0)


POLICY: Final = GcPolicy()
install = POLICY.install
connection_opened = POLICY.connection_opened
connection_closed = POLICY.connection_closed
paused = POLICY.paused
