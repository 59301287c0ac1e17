"""state.json: atomic saves, .bak fallback, high_water only grows, bounded history."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from fleetpush.client.errors import StateError
from fleetpush.client.layout import StateLayout
from fleetpush.client.state import (
    MAX_HISTORY,
    DeviceState,
    StagedInfo,
    TrialInfo,
    load_state,
    save_state,
)


def full_state() -> DeviceState:
    return DeviceState(
        app="demo",
        installed_version="1.0",
        installed_sequence=3,
        high_water=4,
        bad_releases=("0.9",),
        staged=StagedInfo(version="2.0", sequence=4, push_id="p1", forced=True),
        trial=TrialInfo(version="1.0", previous_version="0.8", backup_dir="0.8-1",
                        started_at=1.0, deadline=61.0, attempts=1),
        extra={"added_by_a_newer_client": [1, 2]},
    ).record(5.0, "applied", "1.0")


def test_round_trip_keeps_every_field_and_unknown_keys(tmp_path: Path) -> None:
    state = full_state()
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state


def test_missing_state_is_a_fresh_device(tmp_path: Path) -> None:
    assert load_state(tmp_path) == DeviceState()


@pytest.mark.parametrize("garbage", [b"{not json", b"[]", b'{"high_water": "x"}', b"\xff\xfe"])
def test_corrupt_state_falls_back_to_bak(tmp_path: Path, garbage: bytes) -> None:
    first = full_state()
    save_state(tmp_path, first)
    save_state(tmp_path, first.raise_high_water(9))  # first becomes the .bak
    StateLayout.of(tmp_path).state_file.write_bytes(garbage)
    loaded = load_state(tmp_path, now=7.0)
    assert loaded.high_water == 4 and loaded.installed_version == "1.0"
    assert loaded.history[-1]["state"] == "state-restored"
    # Saving over the corrupt file must not replace the good .bak with garbage.
    save_state(tmp_path, loaded)
    assert load_state(tmp_path) == loaded


def test_both_corrupt_is_an_error_not_a_reset(tmp_path: Path) -> None:
    save_state(tmp_path, full_state())
    save_state(tmp_path, full_state())
    layout = StateLayout.of(tmp_path)
    layout.state_file.write_bytes(b"{")
    layout.state_backup.write_bytes(b"{")
    with pytest.raises(StateError, match="backup is unusable"):
        load_state(tmp_path)


def test_high_water_never_goes_down(tmp_path: Path) -> None:
    state = full_state()
    save_state(tmp_path, state)
    assert state.raise_high_water(2).high_water == 4
    with pytest.raises(StateError, match="high_water"):
        save_state(tmp_path, attrs.evolve(state, high_water=3))
    assert load_state(tmp_path).high_water == 4


def test_history_is_bounded_and_acknowledged(tmp_path: Path) -> None:
    state = DeviceState()
    for i in range(MAX_HISTORY + 10):
        state = state.record(float(i), "applied", f"{i}.0")
    assert len(state.history) == MAX_HISTORY
    assert state.history[0]["version"] == "10.0"
    assert len(state.acknowledge_history(5).history) == MAX_HISTORY - 5


def test_no_temp_files_left_behind(tmp_path: Path) -> None:
    for i in range(3):
        save_state(tmp_path, full_state().raise_high_water(10 + i))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.bak"]
