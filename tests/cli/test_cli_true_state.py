"""What the device commands and the releaser say is true (issue 11, item 6, "True state").

A real releaser on 127.0.0.1, the real ``fleetpush`` entry point over dev-1
(the plain app, ``PORT VERSION PID`` in its status file), and a real agent
where the bug was end to end.
"""

from __future__ import annotations

from pathlib import Path

import trio
from fp_agent import AgentDevice
from fp_releaser import publish, releaser
from fp_trees import app_release


async def test_the_installed_version_is_never_an_update(tmp_path: Path) -> None:
    # A fresh device (sequence 0) on 1.0.0 with 1.0.0 approved was told 1.0.0
    # is an update: "update_available: true" and rc 0 from update --check.
    with trio.fail_after(60):
        data = tmp_path / "data"
        publish(data, app_release(tmp_path, "plain_app", "1.0.0"), "1.0.0", approved=True)
        async with releaser(data) as handle:
            dev = AgentDevice(tmp_path, handle.port)
            ran = await dev.cli("update", "--check", "--json")
            assert ran.code == 10, ran
            doc = ran.json()
            assert doc["installed"] == "1.0.0" and doc["available"] is False, doc
            ran = await dev.cli("status", "--check", "--json")
            assert ran.code == 0, ran
            doc = ran.json()
            assert doc["update_available"] is False, doc
