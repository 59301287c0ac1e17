"""What a device may make the releaser store, and the low-disk mode (issue 10, item 2).

Under auto-enrolment any stranger is a device, and everything a device sends
that the releaser keeps costs disk: 39 ``app_status`` notifications (51 MB)
once grew the database by 268 MB and filled a 256 MiB data dir in 1.4 s. So:

- **bytes**: free text a device sends is clipped before it is stored
  (:func:`clip`, :data:`TEXT_BYTES`), an app's log tail is kept to its last
  :data:`LOG_TAIL_BYTES` (:func:`trim_log_tail`) and stored once, in the
  device's row (history events leave it out). With every stored row bounded,
  the history's row limit (``history_limit``) bounds its bytes too;
- **rate**: :class:`RateLimits` gives each device a token bucket per kind of
  stored write; past it the write is skipped (the live event still reaches
  watchers, the newest state still reaches the device's row);
- **low disk**: :class:`DiskGuard` watches the data dir's free space; under
  its threshold the releaser stores no new history and no app status, keeps
  serving (handshakes of known devices need no write at all, registry.py),
  says so in ``status`` (``low_disk``) and logs the change both ways.

Everything here runs on the trio thread and does no I/O but one ``statvfs``
per :data:`DiskGuard.interval`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

log = logging.getLogger("fleetpush.server")

#: Longest free text (an error, a result) stored from a device, in characters.
TEXT_BYTES: Final = 1024
#: Most log-tail bytes (UTF-8, all lines together) stored per device.
LOG_TAIL_BYTES: Final = 8 * 1024
#: Most log-tail lines stored per device.
LOG_TAIL_LINES: Final = 20

#: Free-space threshold of the low-disk mode (bytes; at most 5% of the filesystem).
LOW_DISK_BYTES: Final = 64 * 1024 * 1024

#: Token buckets per kind of stored write: (burst, refill per second).
RATES: Final[dict[str, tuple[float, float]]] = {
    # app status: the agent sends one per state change of the app.
    "app_status": (10.0, 0.2),
    # progress other than `downloading` (already at most 1/s, device_api.py):
    # an update makes ~6 of them.
    "progress": (30.0, 0.5),
}

#: Devices whose buckets are remembered (least recently used go first).
MAX_TRACKED: Final = 100_000


def clip(text: str | None, limit: int = TEXT_BYTES) -> str | None:
    """``text`` cut to ``limit`` characters (marked), or as it is."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text) - limit} more characters)"


def trim_log_tail(lines: Sequence[str]) -> list[str]:
    """The newest lines that fit :data:`LOG_TAIL_LINES` and :data:`LOG_TAIL_BYTES`.

    A line longer than the budget is kept clipped (its end, the newest part).
    """
    out: list[str] = []
    left = LOG_TAIL_BYTES
    for line in reversed(lines[-LOG_TAIL_LINES:]):
        size = len(line.encode("utf-8", "surrogatepass"))
        if size > left:
            if not out:
                out.append(line[-max(left // 4, 1) :])
            break
        out.append(line)
        left -= size
    out.reverse()
    return out


class RateLimits:
    """A token bucket per (device, kind): may this device store one more row now?"""

    def __init__(
        self,
        rates: dict[str, tuple[float, float]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rates = dict(RATES if rates is None else rates)
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        #: rows refused since start, by kind
        self.refused: dict[str, int] = {}

    def allow(self, device_id: str, kind: str) -> bool:
        """Take a token of ``kind`` for ``device_id``; False (counted) if none is left."""
        burst, per_second = self.rates[kind]
        now = self._clock()
        key = (device_id, kind)
        tokens, then = self._buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + (now - then) * per_second)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        else:
            self.refused[kind] = self.refused.get(kind, 0) + 1
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
        return allowed


class DiskGuard:
    """Whether the data dir's filesystem is under its free-space threshold."""

    def __init__(
        self,
        data_dir: Path,
        threshold: int = LOW_DISK_BYTES,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.threshold = threshold
        self.interval = interval
        self._clock = clock
        self._checked = -float("inf")
        self._low = False
        #: free bytes at the last check (None before the first, or if statvfs failed)
        self.free: int | None = None

    @property
    def low(self) -> bool:
        """True while free space is under the threshold (checked at most every ``interval``)."""
        now = self._clock()
        if now - self._checked >= self.interval:
            self._checked = now
            self._check()
        return self._low

    def _check(self) -> None:
        try:
            st = os.statvfs(self.data_dir)
        except OSError as e:
            log.warning("cannot read the free space of %s: %s", self.data_dir, e)
            self.free = None
            return
        self.free = st.f_bavail * st.f_frsize
        # Never more than 5% of the filesystem: a small dedicated volume is not
        # "low" from its first byte.
        low = self.free < min(self.threshold, st.f_blocks * st.f_frsize // 20)
        if low != self._low:
            self._low = low
            if low:
                log.warning(
                    "low disk: %d bytes free in %s (threshold %d): storing no new history "
                    "or app status until space is freed; still serving",
                    self.free,
                    self.data_dir,
                    self.threshold,
                )
            else:
                log.warning(
                    "disk space recovered: %d bytes free in %s; storing history again",
                    self.free,
                    self.data_dir,
                )
