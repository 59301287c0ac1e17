"""During a trial, a check's steps are not the device's state (issue 11, item 6).

The reporter (client/reporting.py) is driven directly with an in-memory link
that records what would reach the releaser: the checking/up_to_date steps
and a check that *failed* (releaser unreachable) are held back while a
version is on trial; the same steps outside a trial, and the trial's own
steps, are sent.
"""

from __future__ import annotations

from pathlib import Path

from fleetpush.client.context import StateStore
from fleetpush.client.reporting import OutcomeReporter
from fleetpush.client.state import DeviceState, TrialInfo
from fleetpush.protocol.messages import UpdateProgress

ON_TRIAL = DeviceState(
    app="demo",
    installed_version="2.0",
    trial=TrialInfo(
        version="2.0", previous_version="1.0", backup_dir=None, started_at=0.0, deadline=60.0
    ),
)


class RecordingLink:
    """Stands in for the releaser link: remembers every notification."""

    def __init__(self) -> None:
        self.sent: list[UpdateProgress] = []

    @property
    def connected(self) -> bool:
        return True

    async def wait_connected(self, timeout: float) -> object:
        raise AssertionError("not used")

    async def request(self, method: str, params: object, timeout: float) -> object:
        raise AssertionError("not used")

    async def notify(self, method: str, params: object) -> bool:
        assert method == "update_progress" and isinstance(params, UpdateProgress)
        self.sent.append(params)
        return True


async def _report(state: DeviceState, tmp_path: Path) -> list[str]:
    link = RecordingLink()
    reporter = OutcomeReporter("demo", StateStore(tmp_path, state), link)  # type: ignore[arg-type]
    await reporter.progress("checking")
    await reporter.progress("failed", error="check: releaser unreachable", check=True)
    await reporter.progress("up_to_date", "2.0")
    await reporter.progress("committed", "2.0")
    return [p.state for p in link.sent]


async def test_a_failed_check_during_a_trial_is_not_the_devices_state(tmp_path: Path) -> None:
    assert await _report(ON_TRIAL, tmp_path) == ["committed"]


async def test_outside_a_trial_every_step_is_sent(tmp_path: Path) -> None:
    idle = DeviceState(app="demo", installed_version="2.0")
    assert await _report(idle, tmp_path) == ["checking", "failed", "up_to_date", "committed"]
