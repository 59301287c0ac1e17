"""Issue 10, item 8: the console keeps working whatever devices report, and forgets devices.

A real `fleetpush server` (the ``releaser`` fixture), devices that connect
with the real handshake (fleetpush.net.dial), and the real `fleetpush` script.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from pathlib import Path

import pytest
import trio
from cli_helpers import Releaser, Result, run_cli
from fleetpush.protocol import PROTOCOL_VERSION
from fleetpush.protocol.keys import private_key_from_pem, public_bytes
from fleetpush.protocol.messages import AppStatus, DeviceFilter, Empty, Hello
from fp_keys import fixed_key

from fleetpush.cli.exitcodes import EXIT_CONFLICT, EXIT_NOT_FOUND
from fleetpush.net.dial import Dialed, dial
from fleetpush.operator import connect as operator_connect

APP = "sensor"


@pytest.fixture
def releaser(tmp_path: Path) -> Iterator[Releaser]:
    """A `fleetpush server` subprocess on plain TCP (the devices here dial without TLS)."""
    from fleetpush.demo.processes import Children

    keys = tmp_path / "keys"
    keys.mkdir()
    op = run_cli("keygen", "--out", str(keys / "operator.key"))
    assert op.code == 0, op
    with Children(tmp_path / "logs") as children:
        child, host, port = children.start_server(
            tmp_path / "data", operator_keys=[op.out.strip()], insecure=True
        )
        config = tmp_path / "console.toml"
        config.write_text(
            f'server = "{host}:{port}"\n'
            'operator_key = "keys/operator.key"\n'
            'operator_name = "tester"\n'
            "insecure = true\n"
        )
        yield Releaser(
            address=f"{host}:{port}",
            data_dir=tmp_path / "data",
            config=config,
            operator_key=keys / "operator.key",
            release_key=keys / "operator.key",
            release_pub="",
            pid=child.pid,
        )


async def cli(r: Releaser, *args: str) -> Result:
    return await trio.to_thread.run_sync(lambda: run_cli(*args, "--config", str(r.config)))


@asynccontextmanager
async def devices(r: Releaser, count: int, prefix: str) -> AsyncIterator[list[Dialed]]:
    """``count`` device sessions of APP, held open until the block ends."""
    host, port = r.address.split(":")
    async with AsyncExitStack() as stack:
        links = []
        for i in range(count):
            key = fixed_key(f"{prefix}{i}")
            hello = Hello(
                protocol_version=PROTOCOL_VERSION,
                role="device",
                peer_id=f"{prefix}-{i:02d}",
                public_key=public_bytes(key),
                app=APP,
                version="1.0.0",
                channel="stable",
            )
            links.append(
                await stack.enter_async_context(dial((host, int(port)), key, hello, timeout=20))
            )
        yield links


async def test_devices_lists_after_strangers_send_huge_app_status(releaser: Releaser) -> None:
    """7 devices x 1.3 MB of log tail made every `devices` answer exceed 8 MiB, for good."""
    with trio.fail_after(120):
        async with devices(releaser, 7, "loud") as links:
            for link in links:
                tail = [f"{i:02d}" + "x" * 64_000 for i in range(20)]
                await link.peer.notify("app_status", AppStatus(state="error", log_tail=tail))
                await link.peer.request("ping", Empty())  # the notification was handled
            res = await cli(releaser, "devices", "--json")
            assert res.code == 0, res.err
            listed = json.loads(res.out)
            assert sorted(d["device_id"] for d in listed) == [f"loud-{i:02d}" for i in range(7)]
            # A listing carries no log tails (the bulky field), the state still.
            assert all(d["app_status"]["state"] == "error" for d in listed)
            assert all("log_tail" not in d["app_status"] for d in listed)
            res = await cli(releaser, "devices")
            assert res.code == 0 and "loud-06" in res.out, res.err


async def test_listings_are_paginated_and_the_cli_fetches_every_page(releaser: Releaser) -> None:
    key = private_key_from_pem(releaser.operator_key.read_bytes())
    with trio.fail_after(120):
        async with devices(releaser, 5, "page"):
            async with operator_connect(releaser.address, key) as op:
                pages, after = [], None
                while True:
                    page = await op.call("list_devices", DeviceFilter(after=after, limit=2))
                    pages.append([d.device_id for d in page.devices])
                    if page.next is None:
                        break
                    after = page.next
            assert pages == [["page-00", "page-01"], ["page-02", "page-03"], ["page-04"]]
            res = await cli(releaser, "devices", "--json")
            assert res.code == 0, res.err
            assert [d["device_id"] for d in json.loads(res.out)] == [
                f"page-{i:02d}" for i in range(5)
            ]


async def test_devices_forget(releaser: Releaser) -> None:
    key = private_key_from_pem(releaser.operator_key.read_bytes())
    with trio.fail_after(120):
        async with devices(releaser, 2, "gone") as links:
            res = await cli(releaser, "devices", "forget", "gone-00")
            assert res.code == EXIT_CONFLICT, (res.out, res.err)
            assert "connected" in res.err and "--force" in res.err
            res = await cli(releaser, "devices", "forget", "gone-00", "--force", "--json")
            assert res.code == 0, res.err
            assert json.loads(res.out) == {"device_id": "gone-00", "disconnected": True}
            with trio.fail_after(10):
                await links[0].peer.closed.wait()
            res = await cli(releaser, "devices", "--json")
            assert [d["device_id"] for d in json.loads(res.out)] == ["gone-01"]
        # Offline now: forgotten without --force.
        res = await cli(releaser, "devices", "forget", "gone-01")
        assert res.code == 0 and "gone-01: forgotten" in res.out, res.err
        res = await cli(releaser, "devices", "forget", "ghost")
        assert res.code == EXIT_NOT_FOUND, res.err
        # Audited: both are in the event history, with the operator's name.
        async with operator_connect(releaser.address, key, name="tester") as op:
            seen = []
            with trio.move_on_after(3):
                async with aclosing(op.watch(history=100)) as events:
                    async for event in events:
                        if event.kind == "forgotten":
                            seen.append((event.device_id, event.data["disconnected"]))
                        if len(seen) == 2:
                            break
        assert seen == [("gone-00", True), ("gone-01", False)]

