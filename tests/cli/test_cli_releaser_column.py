"""``fleetpush devices`` names each device's releaser when a fleet spans several (issue 15).

One releaser's table is unchanged (no RELEASER column: its width, and so its
device ids, stay as they were); devices on two releasers get the column.
"""

from __future__ import annotations

import pytest
from fleetpush.protocol.messages import DeviceInfo

from fleetpush.cli.output import print_devices


def _device(device_id: str, releaser: str | None) -> DeviceInfo:
    return DeviceInfo(
        device_id=device_id, public_key=b"k" * 32, enrollment="accepted", app="demo",
        version="1.0", channel="stable", group=None, state="idle",
        connected=releaser is not None, first_seen=0.0, last_seen=0.0, releaser=releaser,
    )  # fmt: skip


def _header(out: str) -> list[str]:
    return out.splitlines()[0].split()


def test_devices_on_two_releasers_show_which(capsys: pytest.CaptureFixture[str]) -> None:
    print_devices([_device("d-1", "a.example:7878"), _device("d-2", "b.example:7878")])
    out = capsys.readouterr().out
    assert "RELEASER" in _header(out)
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "a.example:7878" in rows["d-1"] and "b.example:7878" in rows["d-2"]


def test_devices_of_one_releaser_keep_the_table_they_had(
    capsys: pytest.CaptureFixture[str],
) -> None:
    print_devices([_device("d-1", "a.example:7878"), _device("d-2", None)])
    out = capsys.readouterr().out
    assert "RELEASER" not in _header(out)
    assert "a.example" not in out
