"""The releaser's direct push path (push_fanout.py) with real devices over TCP.

A push written straight into a link keeps the push's bookkeeping: a device
whose link ends before it acknowledges still has the command 'sent', and
gets it again when it reconnects (specs/PROTOCOL.md §7.4); every ack is
recorded although no task waits for it.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol.events import RequestReceived
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Hello, Push
from fleetpush.server import ReleaseStore
from fp_releaser import running_releaser
from server_helpers import connect, publish, wait_for

from fleetpush.net.dial import dial
from fleetpush.net.peer import Peer


def _approve(data_dir, version):
    store = ReleaseStore.open(data_dir)
    store.set_status("demo", version, "pre-released", "t")
    store.set_status("demo", version, "approved", "t")
    store.close()


async def test_a_link_closing_mid_push_gets_the_command_on_reconnect(
    config, data_dir, tmp_path, operator_key
):
    publish(data_dir, tmp_path, "1.1", restart=False)
    _approve(data_dir, "1.1")
    key = Ed25519PrivateKey.generate()
    got: list[str] = []

    async def never_acks(peer: Peer, ev: RequestReceived) -> None:
        got.append(ev.params.push_id)
        await peer.close(1001, "device going away before its ack")

    hello = Hello(
        protocol_version="1.0",
        role="device",
        peer_id="mid-1",
        public_key=public_bytes(key),
        app="demo",
        version="1.0",
        channel="stable",
    )
    with trio.fail_after(30):
        async with running_releaser(config) as server:
            pushes = server.services.pushes
            async with connect(server.port, operator_key, role="operator", peer_id="ops") as op:
                async with dial(
                    ("127.0.0.1", server.port), key, hello, timeout=5, on_request=never_acks
                ) as link:
                    result = await op.request(
                        "push", Push(app="demo", version="1.1", mode="force", all=True)
                    )
                    assert result.sent == ["mid-1"]
                    await link.peer.wait_closed()
                assert got == [result.push_id]
                await wait_for(lambda: "mid-1" not in server.services.fleet)
                assert pushes.deliveries(result.push_id)["mid-1"][0] == "sent"
                async with connect(server.port, key, peer_id="mid-1") as dev:
                    await wait_for(lambda: dev.commands)
                    assert dev.commands[0][1].push_id == result.push_id
                    await wait_for(
                        lambda: pushes.deliveries(result.push_id)["mid-1"][0] == "accepted"
                    )


async def test_many_devices_acks_recorded_without_a_task_each(
    config, data_dir, tmp_path, operator_key
):
    publish(data_dir, tmp_path, "1.1", restart=False)
    _approve(data_dir, "1.1")
    names = [f"many-{i}" for i in range(20)]
    with trio.fail_after(30):
        async with running_releaser(config) as server, AsyncExitStack() as stack:
            pushes = server.services.pushes
            op = await stack.enter_async_context(
                connect(server.port, operator_key, role="operator", peer_id="ops")
            )
            devices = [
                await stack.enter_async_context(connect(server.port, peer_id=n)) for n in names
            ]
            result = await op.request(
                "push", Push(app="demo", version="1.1", mode="force", all=True)
            )
            assert sorted(result.sent) == sorted(names)
            # the fan-out wrote every command itself: no delivery task was started
            assert not any(server.services.fleet.get(n)._delivering for n in names)
            await wait_for(
                lambda: all(s == "accepted" for s, *_ in pushes.deliveries(result.push_id).values())
            )
            assert all(len(d.commands) == 1 for d in devices)
