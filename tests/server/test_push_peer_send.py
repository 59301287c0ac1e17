"""The peer's send path used by push delivery: immediate writes, pre-encoded params.

Two :class:`Peer` objects over a real socket pair, their Connections brought
to OPEN in memory first (the handshake itself is tested elsewhere).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from fleetpush.protocol import NEED_DATA, Connection, RequestReceived, RpcError, Side, State
from fleetpush.protocol import messages as m
from fleetpush.protocol.connection import encode_params
from fleetpush.protocol.events import NotificationReceived

from fleetpush.net.peer import Peer, PeerClosed, open_peer

COMMAND = m.UpdateCommand(app="demo", version="2.0.0", restart=False, push_id="p-9")


def _deliver(sender: Connection, receiver: Connection, data: bytes) -> None:
    receiver.receive_data(data, trio.current_time())
    while receiver.next_event() is not NEED_DATA:
        pass


def _open_pair() -> tuple[Connection, Connection]:
    client = Connection(Side.CLIENT, now=trio.current_time())
    server = Connection(Side.SERVER, now=trio.current_time())
    hello = m.Hello(protocol_version="1.0", role="device", peer_id="d-1", public_key=b"k" * 32)
    rid, data = client.send_request("hello", hello)
    _deliver(client, server, data)
    result = m.HelloResult(
        protocol_version="1.0", server_id="s", cid="c", heartbeat=15.0, nonce=b"n" * 32
    )
    _deliver(server, client, server.send_response(rid, result))
    rid, data = client.send_request("auth", m.Auth(signature=b"s" * 64))
    _deliver(client, server, data)
    _deliver(server, client, server.send_response(rid, m.AuthResult(status="accepted")))
    assert client.state is State.OPEN and server.state is State.OPEN
    return client, server


@asynccontextmanager
async def peers(
    on_request: object = None, on_notification: object = None, sndbuf: int | None = None
) -> AsyncIterator[tuple[Peer, Peer]]:
    """(releaser side, device side) peers over a socket pair."""
    a, b = trio.socket.socketpair()
    if sndbuf is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    client_conn, server_conn = _open_pair()
    async with (
        open_peer(trio.SocketStream(a), server_conn, name="releaser") as server,
        open_peer(
            trio.SocketStream(b),
            client_conn,
            name="device",
            on_request=on_request,  # type: ignore[arg-type]
            on_notification=on_notification,  # type: ignore[arg-type]
        ) as client,
    ):
        yield server, client


async def test_pre_encoded_request_round_trip() -> None:
    seen: list[RequestReceived] = []

    async def on_request(peer: Peer, req: RequestReceived) -> None:
        seen.append(req)
        await peer.respond(req.id, m.Ack(accepted=True, reason=str(len(seen))))

    with trio.fail_after(5):
        async with peers(on_request) as (server, _):
            params = encode_params(COMMAND)
            for i in range(1, 4):
                ack = await server.request("__force_update__", params)
                assert ack == m.Ack(accepted=True, reason=str(i))
            assert [r.params for r in seen] == [COMMAND] * 3
            assert server.conn.outstanding == 0


async def test_concurrent_large_writes_never_interleave() -> None:
    """Many tasks write big frames while the socket is nearly full: every frame arrives whole."""
    got: list[m.Event] = []
    done = trio.Event()
    count = 40

    async def on_notification(peer: Peer, note: NotificationReceived) -> None:
        got.append(note.params)
        await trio.sleep(0.001)  # read slowly so the writers meet a full socket
        if len(got) == count:
            done.set()

    with trio.fail_after(20):
        async with peers(on_notification=on_notification, sndbuf=8192) as (server, client):

            async def write(i: int) -> None:
                await server.notify("event", m.Event(seq=i, time=0.0, kind="x" * (20_000 + i)))

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(write, i)
            await done.wait()
            assert sorted(e.seq for e in got) == list(range(count))
            assert all(len(e.kind) == 20_000 + e.seq for e in got)
            assert client.close_code is None


async def test_cancelled_caller_sends_nothing() -> None:
    async with peers() as (server, _):
        before = server.bytes_sent
        with trio.CancelScope() as scope:
            scope.cancel()
            await server.notify("event", m.Event(seq=1, time=0.0, kind="k"))
        assert scope.cancelled_caught
        assert server.bytes_sent == before


async def test_request_timeout_and_errors_unchanged() -> None:
    async def on_request(peer: Peer, req: RequestReceived) -> None:
        if req.params.push_id == "refuse":
            raise RpcError(-32000, "nope")
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with peers(on_request) as (server, _):
            with pytest.raises(trio.TooSlowError):
                await server.request("__force_update__", encode_params(COMMAND), timeout=0.1)
            assert server._pending == {}
            refuse = m.UpdateCommand(app="a", version="1", restart=False, push_id="refuse")
            with pytest.raises(RpcError):
                await server.request("__force_update__", encode_params(refuse))


async def test_peer_closed_while_waiting_and_after() -> None:
    async def on_request(peer: Peer, req: RequestReceived) -> None:
        await peer.close()

    with trio.fail_after(10):
        async with peers(on_request) as (server, _):
            with pytest.raises(PeerClosed):
                await server.request("__force_update__", encode_params(COMMAND))
            with pytest.raises(PeerClosed):
                await server.request("__force_update__", encode_params(COMMAND))
