"""The device's staleness rule without a clock (client/freshness.py, specs/PROTOCOL.md §8.6).

The end-to-end test (test_freshness_e2e.py) shows a frozen releaser is
reported; its time bounds leave room for a loaded machine, so the exact
boundary is pinned here, with ``now`` passed in.
"""

from __future__ import annotations

from fleetpush.client.freshness import FRESHNESS, is_stale
from fleetpush.client.state import DeviceState


def test_a_statement_is_fresh_until_the_instant_it_expires() -> None:
    state = DeviceState(app="demo", extra={FRESHNESS: {"counter": 3, "expires": 100.0}})
    assert not is_stale(state, 99.999)
    assert is_stale(state, 100.0)
    assert is_stale(state, 1e9)


def test_a_device_that_never_accepted_a_statement_is_stale() -> None:
    assert is_stale(DeviceState(app="demo"), 0.0)
    assert is_stale(DeviceState(app="demo", extra={FRESHNESS: "garbage"}), 0.0)
