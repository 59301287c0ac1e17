"""The one duration grammar of config files and flags (protocol/durations.py)."""

from __future__ import annotations

import pytest
from fleetpush.protocol.durations import DurationError, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90d", 90 * 86400), ("12h", 43200), ("1.5h", 5400), ("15m", 900), ("30s", 30),
     ("30", 30), (" 2w ", 1209600), (45, 45), (0.5, 0.5), ("0", 0)],
)
def test_durations_read_as_seconds(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "d", "-1d", "1y", "1 d 2h", "nan", "1e3", True, -5, float("inf")]
)
def test_anything_else_is_refused_with_an_example(text: object) -> None:
    with pytest.raises(DurationError, match="is not a duration"):
        parse_duration(text)  # type: ignore[arg-type]
