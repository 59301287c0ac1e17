"""Why a device is deferred, as `devices` and `watch` print it (issue 12, part 3)."""

from __future__ import annotations

from fleetpush.protocol.messages import DeviceInfo, Event

from fleetpush.cli import output
from fleetpush.cli.watch_cmd import FleetView

REASON = "3 users active (waiting for window 02:00-06:00)"


def _device(**kw: object) -> DeviceInfo:
    fields: dict[str, object] = dict(
        device_id="dev-1",
        public_key=b"\0" * 32,
        enrollment="accepted",
        app="demo",
        version="1.0.0",
        channel="stable",
        group=None,
        state="idle",
        connected=True,
        first_seen=1.0,
        last_seen=1.0,
    )
    fields.update(kw)
    return DeviceInfo(**fields)  # type: ignore[arg-type]


def test_the_listing_shows_the_reason_with_deferred_only() -> None:
    deferred = _device(state="deferred", state_error=REASON)
    # devices: STATE, and the reason in REASON; watch (no REASON column): in the state.
    assert output.device_state(deferred, reason=False) == "deferred"
    assert output.reason_text(deferred) == REASON
    assert output.device_state(deferred) == f"deferred: {REASON}"
    assert output.device_state(_device(state="deferred")) == "deferred"
    # Another state's error (a download retry) is no reason to show.
    staged = _device(state="staged", state_error="attempt 1/5")
    assert output.device_state(staged) == "staged"
    assert output.reason_text(staged) == "-"


def test_watch_follows_the_reason_from_events() -> None:
    view = FleetView()
    view.reset([_device(state="staged")])
    deferred = Event(
        seq=1,
        time=2.0,
        kind="progress",
        device_id="dev-1",
        data={"state": "deferred", "version": "2.0.0", "error": REASON},
    )
    view.apply(deferred)
    assert output.device_state(view.devices["dev-1"]) == f"deferred: {REASON}"
    assert f"why: {REASON}" in output.describe_event(deferred)
    view.apply(
        Event(seq=2, time=3.0, kind="progress", device_id="dev-1", data={"state": "applying"})
    )
    assert view.devices["dev-1"].state_error is None
    assert output.device_state(view.devices["dev-1"]) == "applying"
    failed = Event(
        seq=3, time=4.0, kind="progress", device_id="dev-1", data={"state": "failed", "error": "x"}
    )
    assert "error: x" in output.describe_event(failed)
