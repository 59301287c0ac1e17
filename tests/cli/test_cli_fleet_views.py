"""Issue 13, part 2: the fleet, inspected. `devices` filters and its REASON
column, `devices show ID`, and `events` (the audit history) through the real
`fleetpush` script against a real `fleetpush server`, with devices that
connect through the real handshake and report what real devices report."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import trio
from cli_helpers import Releaser, cli, devices, run_cli
from fleetpush.protocol.keys import private_key_from_pem
from fleetpush.protocol.messages import AppStatus, Empty, EventFilter, UpdateProgress

from fleetpush.cli.exitcodes import EXIT_NOT_FOUND, EXIT_USAGE
from fleetpush.operator import connect as operator_connect


async def test_devices_filters_reason_and_show(plain_releaser: Releaser) -> None:
    with trio.fail_after(120):
        async with devices(plain_releaser, 1, "gone"):
            pass  # gone-00 is registered, then offline
        async with devices(plain_releaser, 3, "dev") as links:
            bad = links[1].peer
            await bad.notify(
                "update_progress",
                UpdateProgress(state="failed", app="sensor", version="2.0.0",
                               error="apply: no space left on device"),
            )
            await bad.notify(
                "app_status",
                AppStatus(state="running", pid=42, log_tail=["booting", "listening on :8000"]),
            )
            await bad.request("ping", Empty())  # both notifications were handled

            res = await cli(plain_releaser, "devices", "--connected", "--json")
            assert res.code == 0, res.err
            assert [d["device_id"] for d in json.loads(res.out)] == ["dev-00", "dev-01", "dev-02"]
            res = await cli(plain_releaser, "devices", "--disconnected", "--json")
            assert [d["device_id"] for d in json.loads(res.out)] == ["gone-00"], res.err
            res = await cli(plain_releaser, "devices", "--state", "failed", "--json")
            assert [d["device_id"] for d in json.loads(res.out)] == ["dev-01"], res.err
            res = await cli(plain_releaser, "devices", "--version", "9.9", "--json")
            assert json.loads(res.out) == [], res.err

            # A table written to a pipe is not cut at 80 columns (output.PIPE_WIDTH).
            # The test process's inherited environment says COLUMNS=80: drop it.
            env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
            res = await trio.to_thread.run_sync(
                lambda: run_cli("devices", "--config", str(plain_releaser.config), env=env)
            )
            assert res.code == 0, res.err
            assert "REASON" in res.out, res.out
            line = next(row for row in res.out.splitlines() if row.startswith("dev-01"))
            assert "failed 2.0.0: apply: no space left on device" in line

            res = await cli(plain_releaser, "devices", "show", "dev-01")
            assert res.code == 0, res.err
            fields = dict(
                re.split(r"\s{2,}", line, maxsplit=1)
                for line in res.out.split("\n\n")[0].splitlines()
            )
            assert fields["enrollment"] == "accepted" and fields["connected"] == "yes"
            assert fields["app status"] == "running pid 42"
            assert fields["reason"] == "failed 2.0.0: apply: no space left on device"
            assert "  listening on :8000" in res.out.splitlines()
            assert "history:" in res.out and "pushes: -" in res.out
            res = await cli(plain_releaser, "devices", "show", "dev-01", "--json")
            detail = json.loads(res.out)
            assert detail["device"]["app_status"]["log_tail"] == ["booting", "listening on :8000"]
            assert any(e["kind"] == "progress" and e["data"]["state"] == "failed"
                       for e in detail["history"])
            res = await cli(plain_releaser, "devices", "show", "nobody")
            assert res.code == EXIT_NOT_FOUND, res.err
            error = res.err.splitlines()[-1]  # after the --insecure warning
            assert error == "fleetpush: showing the device: no device 'nobody'", res.err


async def test_events_filters_pages_and_audits(plain_releaser: Releaser) -> None:
    key = private_key_from_pem(plain_releaser.operator_key.read_bytes())
    with trio.fail_after(120):
        async with devices(plain_releaser, 2, "ev") as links:
            for i, state in enumerate(("checking", "up_to_date", "failed")):
                await links[0].peer.notify(
                    "update_progress", UpdateProgress(state=state, app="sensor", error=str(i))
                )
            await links[0].peer.request("ping", Empty())
        res = await cli(plain_releaser, "devices", "forget", "ev-01")
        assert res.code == 0, res.err

        res = await cli(plain_releaser, "events", "--device", "ev-00", "--json")
        assert res.code == 0, res.err
        mine = json.loads(res.out)
        assert mine and {e["device_id"] for e in mine} == {"ev-00"}
        assert [e["seq"] for e in mine] == sorted(e["seq"] for e in mine)  # oldest first
        states = [e["data"].get("state") for e in mine if e["kind"] == "progress"]
        assert states == ["checking", "up_to_date", "failed"]

        res = await cli(plain_releaser, "events", "--type", "forgotten")
        assert res.code == 0, res.err
        assert "forgotten" in res.out and "ev-01" in res.out and "operator=tester" in res.out
        res = await cli(plain_releaser, "events", "--type", "forgotten", "--since", "1h", "--json")
        assert [e["device_id"] for e in json.loads(res.out)] == ["ev-01"]
        res = await cli(plain_releaser, "events", "--limit", "2", "--json")
        assert len(json.loads(res.out)) == 2

        # Pages walk back without overlap (the raw method, as a script would).
        async with operator_connect(plain_releaser.address, key) as op:
            first = await op.call("list_events", EventFilter(limit=3))
            assert first.next is not None and len(first.events) == 3
            second = await op.call("list_events", EventFilter(limit=3, before=first.next))
            assert max(e.seq for e in second.events) < min(e.seq for e in first.events)
            future = await op.call("list_events", EventFilter(since=time.time() + 3600))
            assert future.events == [] and future.next is None

        res = await cli(plain_releaser, "events", "--since", "yesterday")
        assert res.code == EXIT_USAGE
        assert res.err.strip() == (
            "fleetpush: --since: 'yesterday' is not a duration (like 30s, 15m, 12h, 90d)"
        )


def test_event_retention_setting_reads_durations(tmp_path: Path) -> None:
    from fleetpush.server import ServerConfig
    from fleetpush.server.errors import ConfigError

    assert ServerConfig(data_dir=tmp_path, event_retention="90d").event_retention == 90 * 86400
    try:
        ServerConfig(data_dir=tmp_path, event_retention="forever")
    except ConfigError as e:
        assert "not a duration" in str(e)
    else:
        raise AssertionError("a bad event_retention was accepted")
