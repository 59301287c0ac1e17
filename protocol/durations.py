"""Durations as people write them in config files and flags: ``90d``, ``12h``, ``30s``.

Pure and shared by the releaser's and the device's settings (``event_retention``,
backup ages, waits), so one grammar reads the same everywhere: a number
(integer or decimal) and an optional unit ``s`` (default), ``m``, ``h``, ``d``
or ``w``; a bare number in a TOML file is seconds.
"""

from __future__ import annotations

import math
import re
from typing import Final

from .errors import FleetpushError

UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")


class DurationError(FleetpushError, ValueError):
    """Text that is not a duration; the message says what was expected."""


def parse_duration(value: str | float | int) -> float:
    """Seconds in ``value`` (``"90d"``, ``"1.5h"``, ``"30"``, or a number of seconds).

    Raises :class:`DurationError` for anything else, including negative or
    non-finite numbers.
    """
    if isinstance(value, bool):
        raise DurationError(f"{value!r} is not a duration (like 30s, 15m, 12h, 90d)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        found = _DURATION.fullmatch(value)
        if found is None:
            raise DurationError(f"{value!r} is not a duration (like 30s, 15m, 12h, 90d)")
        seconds = float(found.group(1)) * UNITS[found.group(2) or "s"]
    if not math.isfinite(seconds) or seconds < 0:
        raise DurationError(f"{value!r} is not a duration (like 30s, 15m, 12h, 90d)")
    return seconds
