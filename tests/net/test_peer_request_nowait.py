"""Peer.request_nowait: a push's command written straight into an idle link (issue 15).

Two real peers over TCP on 127.0.0.1 (port 0), their Connections brought to
OPEN in memory first (the handshake is tested elsewhere). The device side's
reader is held in a notification handler to stop it reading, which fills
the releaser's socket for real.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from fleetpush.protocol import NEED_DATA, Connection, RequestReceived, Side, State
from fleetpush.protocol import messages as m
from fleetpush.protocol.connection import encode_params
from fleetpush.protocol.events import NotificationReceived, ResponseReceived

from fleetpush.net.peer import Peer, PeerClosed, open_peer

PARAMS = encode_params(m.UpdateCommand(app="demo", version="2.0.0", restart=False, push_id="p"))
MANY = 20_000


def _pump(src: Connection, dst: Connection, data: bytes) -> None:
    dst.receive_data(data, trio.current_time())
    while dst.next_event() is not NEED_DATA:
        pass


def _open_pair() -> tuple[Connection, Connection]:
    now = trio.current_time()
    # Room for many unanswered pushes, so that the releaser's socket fills up.
    client = Connection(Side.CLIENT, now=now, max_outstanding=MANY)
    server = Connection(Side.SERVER, now=now, max_outstanding=MANY)
    hello = m.Hello(protocol_version="1.0", role="device", peer_id="d-1", public_key=b"k" * 32)
    rid, data = client.send_request("hello", hello)
    _pump(client, server, data)
    result = m.HelloResult(
        protocol_version="1.0", server_id="s", cid="c", heartbeat=15.0, nonce=b"n" * 32
    )
    _pump(server, client, server.send_response(rid, result))
    rid, data = client.send_request("auth", m.Auth(signature=b"s" * 64))
    _pump(client, server, data)
    _pump(server, client, server.send_response(rid, m.AuthResult(status="accepted")))
    assert client.state is State.OPEN and server.state is State.OPEN
    return client, server


class Device:
    """The device end: records what arrives, in order; can stop reading."""

    def __init__(self) -> None:
        self.arrived: list[str] = []
        self.gate = trio.Event()
        self.gate.set()
        self.answer = True

    async def on_request(self, peer: Peer, req: RequestReceived) -> None:
        if self.answer:
            await peer.respond(req.id, m.Ack(accepted=True))

    async def on_notification(self, peer: Peer, note: NotificationReceived) -> None:
        self.arrived.append(f"event {note.params.seq}")
        await self.gate.wait()  # the reader waits here: nothing more is read


@asynccontextmanager
async def peers(device: Device) -> AsyncIterator[tuple[Peer, Peer]]:
    """(releaser side, device side) peers over real TCP on 127.0.0.1."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: trio.MemorySendChannel[trio.SocketStream]
        accepted, incoming = trio.open_memory_channel[trio.SocketStream](1)

        async def accept() -> None:
            accepted.send_nowait(await listeners[0].accept())  # type: ignore[arg-type]

        nursery.start_soon(accept)
        dev_stream = await trio.open_tcp_stream("127.0.0.1", port)
        rel_stream = await incoming.receive()
        # small buffers: one 60 KB frame fills them while the device is not reading
        rel_stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        dev_stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        client_conn, server_conn = _open_pair()
        real_next = client_conn.next_event

        def next_event() -> object:  # the device's decoded frames, in wire order
            ev = real_next()
            if isinstance(ev, RequestReceived):
                device.arrived.append(f"request {ev.id}")
            return ev

        client_conn.next_event = next_event  # type: ignore[method-assign]
        async with (
            open_peer(rel_stream, server_conn, name="releaser") as releaser,
            open_peer(
                dev_stream,
                client_conn,
                name="device",
                on_request=device.on_request,
                on_notification=device.on_notification,
            ) as dev,
        ):
            yield releaser, dev
        await listeners[0].aclose()


async def _stop_reading(releaser: Peer, device: Device) -> None:
    device.gate = trio.Event()
    await releaser.notify("event", m.Event(seq=0, time=0.0, kind="stop"))
    while device.arrived != ["event 0"]:
        await trio.sleep(0.01)


async def test_written_at_once_and_acked_by_callback() -> None:
    device = Device()
    outcomes: list[object] = []
    with trio.fail_after(10):
        async with peers(device) as (releaser, _):
            tasks_before = len(trio.lowlevel.current_root_task().child_nurseries)
            assert releaser.request_nowait(
                "__force_update__", PARAMS, outcomes.append, timeout=10.0
            )
            assert releaser.bytes_sent > 0  # written before returning, no task started
            assert len(trio.lowlevel.current_root_task().child_nurseries) == tasks_before
            while not outcomes:
                await trio.sleep(0.01)
            (outcome,) = outcomes
            assert isinstance(outcome, ResponseReceived)
            assert outcome.result == m.Ack(accepted=True)
            assert releaser.conn.outstanding == 0


async def test_full_socket_keeps_the_frame_whole_and_first() -> None:
    """A frame the socket took in part (or not at all) is finished before anything else."""
    device = Device()
    outcomes: list[object] = []
    with trio.fail_after(30):
        async with peers(device) as (releaser, dev):
            await _stop_reading(releaser, device)
            sent = 0
            while not releaser._backlog:  # until the socket refuses part of a frame
                assert sent < MANY, "the socket never filled"
                assert releaser.request_nowait(
                    "__force_update__", PARAMS, outcomes.append, timeout=20.0
                )
                sent += 1
            # The send side is no longer idle: the next push takes the normal path.
            assert not releaser.request_nowait(
                "__force_update__", PARAMS, outcomes.append, timeout=20.0
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(releaser.notify, "event", m.Event(seq=1, time=0.0, kind="after"))
                await trio.sleep(0.05)
                device.gate.set()
            while len(outcomes) < sent or device.arrived[-1:] != ["event 1"]:
                await trio.sleep(0.01)
            assert device.arrived == [
                "event 0",
                *(f"request {rid}" for rid in range(rid_of(device), rid_of(device) + sent)),
                "event 1",
            ]
            assert all(isinstance(o, ResponseReceived) for o in outcomes)
            assert dev.close_code is None and releaser.close_code is None


def rid_of(device: Device) -> int:
    return int(device.arrived[1].split()[1])


async def test_busy_link_is_refused_and_order_kept() -> None:
    """While another task holds the send lock (a big write), nothing is written."""
    device = Device()
    outcomes: list[object] = []
    with trio.fail_after(30):
        async with peers(device) as (releaser, _):
            await _stop_reading(releaser, device)
            async with trio.open_nursery() as nursery:
                for seq in range(1, 11):  # 600 KB: a write blocks, nobody reads
                    big = m.Event(seq=seq, time=0.0, kind="x" * 60_000)
                    nursery.start_soon(releaser.notify, "event", big)
                await trio.sleep(0.1)
                assert releaser._send_lock.locked()
                sent_before = releaser.bytes_sent
                assert not releaser.request_nowait(
                    "__force_update__", PARAMS, outcomes.append, timeout=10.0
                )
                assert releaser.bytes_sent == sent_before and not releaser._backlog
                device.gate.set()
            ack = await releaser.request("__force_update__", PARAMS)  # the normal path
            assert ack == m.Ack(accepted=True)
            events = [a for a in device.arrived if a.startswith("event")]
            assert sorted(events) == sorted(f"event {i}" for i in range(11))
            assert device.arrived[-1].startswith("request")  # after every event
            assert outcomes == []


async def test_link_closing_mid_push_answers_peer_closed() -> None:
    device = Device()
    device.answer = False
    outcomes: list[object] = []
    with trio.fail_after(10):
        async with peers(device) as (releaser, dev):
            assert releaser.request_nowait(
                "__force_update__", PARAMS, outcomes.append, timeout=10.0
            )
            while not device.arrived:
                await trio.sleep(0.01)
            await dev.close(1001, "device going away")
            await releaser.wait_closed()
            assert len(outcomes) == 1 and isinstance(outcomes[0], PeerClosed)
            # a closed link takes nothing more: the push queues it for the next connection
            assert not releaser.request_nowait(
                "__force_update__", PARAMS, outcomes.append, timeout=10.0
            )
            assert len(outcomes) == 1


async def test_no_ack_in_time_answers_too_slow_once() -> None:
    device = Device()
    device.answer = False
    outcomes: list[object] = []
    with trio.fail_after(10):
        async with peers(device) as (releaser, _):
            assert releaser.request_nowait("__force_update__", PARAMS, outcomes.append, timeout=0.2)
            while not outcomes:
                await trio.sleep(0.01)
            assert len(outcomes) == 1 and isinstance(outcomes[0], trio.TooSlowError)
            assert releaser._answers.deadline == float("inf")
            await trio.sleep(0.1)
            assert len(outcomes) == 1
            assert releaser.close_code is None  # a late ack is not a protocol error
