"""Issue 10, item 8: the console keeps working whatever devices report, and forgets devices.

A real `fleetpush server` (the ``plain_releaser`` fixture), devices that connect
with the real handshake (fleetpush.net.dial), and the real `fleetpush` script.
"""

from __future__ import annotations

import json
from contextlib import aclosing

import trio
from cli_helpers import Releaser, cli, devices
from fleetpush.protocol.keys import private_key_from_pem
from fleetpush.protocol.messages import AppStatus, DeviceFilter, Empty

from fleetpush.cli.exitcodes import EXIT_CONFLICT, EXIT_NOT_FOUND
from fleetpush.operator import connect as operator_connect


async def test_devices_lists_after_strangers_send_huge_app_status(
    plain_releaser: Releaser,
) -> None:
    """7 devices x 1.3 MB of log tail made every `devices` answer exceed 8 MiB, for good."""
    with trio.fail_after(120):
        async with devices(plain_releaser, 7, "loud") as links:
            for link in links:
                tail = [f"{i:02d}" + "x" * 64_000 for i in range(20)]
                await link.peer.notify("app_status", AppStatus(state="error", log_tail=tail))
                await link.peer.request("ping", Empty())  # the notification was handled
            res = await cli(plain_releaser, "devices", "--json")
            assert res.code == 0, res.err
            listed = json.loads(res.out)
            assert sorted(d["device_id"] for d in listed) == [f"loud-{i:02d}" for i in range(7)]
            # A listing carries no log tails (the bulky field), the state still.
            assert all(d["app_status"]["state"] == "error" for d in listed)
            assert all("log_tail" not in d["app_status"] for d in listed)
            res = await cli(plain_releaser, "devices")
            assert res.code == 0 and "loud-06" in res.out, res.err


async def test_listings_are_paginated_and_the_cli_fetches_every_page(
    plain_releaser: Releaser,
) -> None:
    key = private_key_from_pem(plain_releaser.operator_key.read_bytes())
    with trio.fail_after(120):
        async with devices(plain_releaser, 5, "page"):
            async with operator_connect(plain_releaser.address, key) as op:
                pages, after = [], None
                while True:
                    page = await op.call("list_devices", DeviceFilter(after=after, limit=2))
                    pages.append([d.device_id for d in page.devices])
                    if page.next is None:
                        break
                    after = page.next
            assert pages == [["page-00", "page-01"], ["page-02", "page-03"], ["page-04"]]
            res = await cli(plain_releaser, "devices", "--json")
            assert res.code == 0, res.err
            assert [d["device_id"] for d in json.loads(res.out)] == [
                f"page-{i:02d}" for i in range(5)
            ]


async def test_devices_forget(plain_releaser: Releaser) -> None:
    key = private_key_from_pem(plain_releaser.operator_key.read_bytes())
    with trio.fail_after(120):
        async with devices(plain_releaser, 2, "gone") as links:
            res = await cli(plain_releaser, "devices", "forget", "gone-00")
            assert res.code == EXIT_CONFLICT, (res.out, res.err)
            assert "connected" in res.err and "--force" in res.err
            res = await cli(plain_releaser, "devices", "forget", "gone-00", "--force", "--json")
            assert res.code == 0, res.err
            assert json.loads(res.out) == {"device_id": "gone-00", "disconnected": True}
            with trio.fail_after(10):
                await links[0].peer.closed.wait()
            res = await cli(plain_releaser, "devices", "--json")
            assert [d["device_id"] for d in json.loads(res.out)] == ["gone-01"]
        # Offline now: forgotten without --force.
        res = await cli(plain_releaser, "devices", "forget", "gone-01")
        assert res.code == 0 and "gone-01: forgotten" in res.out, res.err
        res = await cli(plain_releaser, "devices", "forget", "ghost")
        assert res.code == EXIT_NOT_FOUND, res.err
        # Audited: both are in the event history, with the operator's name.
        async with operator_connect(plain_releaser.address, key, name="tester") as op:
            seen = []
            with trio.move_on_after(3):
                async with aclosing(op.watch(history=100)) as events:
                    async for event in events:
                        if event.kind == "forgotten":
                            seen.append((event.device_id, event.data["disconnected"]))
                        if len(seen) == 2:
                            break
        assert seen == [("gone-00", True), ("gone-01", False)]

