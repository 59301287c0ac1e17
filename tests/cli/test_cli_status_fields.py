"""`fleetpush status` says which root of trust the device is on, the schema its
data is at, and what its app last reported as activity (issues 12 and 17),
through a running agent and from the state dir alone. Real releaser, real
`fleetpush agent`, the real `fleetpush` script."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from fleetpush.client import local
from fp_agent import AgentDevice
from fp_releaser import releaser

pytestmark = pytest.mark.slow


def fields(text: str) -> dict[str, str]:
    return {line[:17].strip(): line[18:] for line in text.splitlines() if len(line) > 18}


async def test_status_shows_root_data_schema_and_activity(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with releaser(tmp_path / "data") as handle:
            dev = AgentDevice(tmp_path, handle.port)
            try:
                await dev.start_agent()
                await dev.wait_owner()
                await trio.to_thread.run_sync(
                    lambda: local.report_activity(users=2, state_dir=dev.state_dir)
                )
                ran = await dev.cli("status")
                assert ran.code == 0, ran.err
                shown = fields(ran.out)
                # trusted_keys only: the implicit root v0 (README, key ceremony).
                assert shown["root_version"] == "0", ran.out
                assert shown["data_schema"] == "-", ran.out  # no release claimed one
                assert shown["activity"] == "2 user(s) (by report)", ran.out
                assert (await dev.cli("status", "--json")).json()["activity"]["users"] == 2
            finally:
                await dev.stop_agents()
            # No agent now: read from the state dir, and still no activity to show.
            ran = await dev.cli("status", "--offline")
            assert ran.code == 0, ran.err
            shown = fields(ran.out)
            assert shown["root_version"] == "0" and shown["data_schema"] == "-", ran.out
            assert "activity" not in shown
