"""The releaser does what specs/PROTOCOL.md says (issue 9, "Spec and server must agree").

Each test pins one agreed behaviour through a real releaser on 127.0.0.1. The
client side is a bare sans-IO :class:`Connection` over a TCP stream (no
``Peer``), so the test sees every frame the releaser sends, sends frames the
API would refuse to build, and answers pings and nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    CloseCode,
    Connection,
    ConnectionClosed,
    ErrorCode,
    ErrorReceived,
    ResponseReceived,
    Side,
    auth_payload,
    codec,
    sign_challenge,
)
from fleetpush.protocol.events import ConnectionEvent
from fleetpush.protocol.frames import encode_message_frame
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import (
    Auth,
    CheckUpdate,
    DeviceFilter,
    Empty,
    Enrollment,
    GetChunks,
    GetManifest,
    Hello,
)
from fleetpush.server import ServerConfig
from fp_keys import fixed_key
from fp_releaser import approve_in_store, running_releaser
from server_helpers import connect, publish

DEVICE_KEY = fixed_key(0x51)


class Wire:
    """A client Connection over a TCP stream, driven by hand."""

    def __init__(self, stream: trio.SocketStream, conn: Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.events: list[ConnectionEvent] = []
        self.pings: list[float] = []  # when each ping of the releaser arrived
        self.eof = False

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def pump(self, until: Callable[[Wire], bool], timeout: float) -> None:
        """Receive, answer pings (only), collect events, until ``until`` or EOF."""
        with trio.move_on_after(timeout):
            while not until(self) and not self.eof:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                now = trio.current_time()
                self.conn.receive_data(data, now)
                if not data:
                    self.eof = True
                while (event := self.conn.next_event()) is not NEED_DATA:
                    assert not isinstance(event, type(NEED_DATA))
                    self.events.append(event)
                pong = self.conn.data_to_send()  # the only thing it queues by itself
                if pong:
                    self.pings.append(now)
                    await self.send(pong)

    async def request(self, method: str, params: object, timeout: float = 5.0) -> ConnectionEvent:
        rid, data = self.conn.send_request(method, params)
        await self.send(data)

        def answered(w: Wire) -> bool:
            return any(getattr(e, "id", None) == rid for e in w.events)

        await self.pump(answered, timeout)
        [answer] = [e for e in self.events if getattr(e, "id", None) == rid]
        return answer

    async def until_closed(self, timeout: float = 5.0) -> ConnectionClosed:
        await self.pump(lambda w: any(isinstance(e, ConnectionClosed) for e in w.events), timeout)
        [closed] = [e for e in self.events if isinstance(e, ConnectionClosed)]
        return closed


def _hello(key: Ed25519PrivateKey = DEVICE_KEY, **changes: Any) -> Hello:
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id="dev-1",
        public_key=public_bytes(key),
        app="demo",
        version="1.0",
        channel="stable",
    )
    return attrs.evolve(hello, **changes)


@asynccontextmanager
async def wire(port: int) -> AsyncIterator[Wire]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    # It never pings by itself: it only answers the releaser's pings.
    conn = Connection(
        Side.CLIENT, now=trio.current_time(), heartbeat=1000.0, handshake_timeout=1000.0
    )
    try:
        yield Wire(stream, conn)
    finally:
        await stream.aclose()


async def _authenticate(
    w: Wire, hello: Hello, key: Ed25519PrivateKey = DEVICE_KEY, *, signature: bytes | None = None
) -> ConnectionEvent:
    """Send hello, then auth; returns the answer to the last request sent."""
    answer = await w.request("hello", hello)
    if not isinstance(answer, ResponseReceived):
        return answer
    result = answer.result
    payload = auth_payload(
        server_id=result.server_id,
        cid=result.cid,
        nonce=result.nonce,
        role=hello.role,
        peer_id=hello.peer_id,
        public_key=hello.public_key,
    )
    return await w.request("auth", Auth(signature=signature or sign_challenge(key, payload)))


def _raw(envelope: list[object]) -> bytes:
    return encode_message_frame(codec.packb(envelope))


# --- item 1: a refused handshake is the error, then bye N (§5.5) ------------------------

REFUSED_HELLOS: dict[str, tuple[dict[str, Any], ErrorCode, CloseCode, str]] = {
    "another major version": (
        {"protocol_version": "2.0"},
        ErrorCode.VERSION_MISMATCH,
        CloseCode.VERSION_MISMATCH,
        "protocol version 2.0 is not supported: this releaser speaks 1.1",
    ),
    '"1" is not "major.minor"': (
        {"protocol_version": "1"},
        ErrorCode.INVALID_PARAMS,
        CloseCode.POLICY,
        'protocol_version must be "major.minor" like "1.1", got \'1\'',
    ),
    "a 31-byte public key": (
        {"public_key": b"k" * 31},
        ErrorCode.INVALID_PARAMS,
        CloseCode.POLICY,
        "public_key must be 32 bytes, got 31",
    ),
    "a malformed device id": (
        {"peer_id": "-dev"},
        ErrorCode.INVALID_PARAMS,
        CloseCode.POLICY,
        "device id must be 1-128 of A-Z a-z 0-9 . _ : @ - (starting alphanumeric), got '-dev'",
    ),
}


@pytest.mark.parametrize("case", REFUSED_HELLOS)
async def test_refused_hello_is_error_then_bye(config: ServerConfig, case: str) -> None:
    changes, code, close, reason = REFUSED_HELLOS[case]
    with trio.fail_after(10):
        async with running_releaser(config) as server, wire(server.port) as w:
            answer = await w.request("hello", _hello(**changes))
            assert isinstance(answer, ErrorReceived)
            assert (answer.code, answer.message) == (code, reason)
            closed = await w.until_closed()
            assert (closed.code, closed.reason) == (close, reason)
            assert [type(e) for e in w.events] == [ErrorReceived, ConnectionClosed]


async def test_refused_auth_is_error_then_bye(config: ServerConfig) -> None:
    with trio.fail_after(10):
        async with running_releaser(config) as server, wire(server.port) as w:
            answer = await _authenticate(w, _hello(), signature=b"\x00" * 64)
            assert isinstance(answer, ErrorReceived)
            assert (answer.code, answer.message) == (
                ErrorCode.AUTH_FAILED,
                "bad signature over the nonce",
            )
            closed = await w.until_closed()
            assert (closed.code, closed.reason) == (
                CloseCode.AUTH_FAILED,
                "bad signature over the nonce",
            )


async def test_rejected_device_is_error_then_bye_1011(
    config: ServerConfig, operator_key: Ed25519PrivateKey
) -> None:
    with trio.fail_after(10):
        async with running_releaser(config) as server:
            async with connect(server.port, DEVICE_KEY):
                pass
            async with connect(server.port, operator_key, role="operator", peer_id="ops") as op:
                await op.request(
                    "set_enrollment", Enrollment(device_id="dev-1", decision="rejected")
                )
            async with wire(server.port) as w:
                answer = await _authenticate(w, _hello())
                assert isinstance(answer, ErrorReceived)
                assert answer.code == ErrorCode.REJECTED
                closed = await w.until_closed()
                assert closed.code == CloseCode.AUTH_FAILED


async def test_the_peer_adapter_sees_the_close_code(config: ServerConfig) -> None:
    # The trio Peer, not only the bare Connection, reports the bye's code.
    with trio.fail_after(10):
        async with running_releaser(config) as server:
            with pytest.raises(Exception) as info:
                async with connect(server.port, protocol_version="2.0") as dev:
                    del dev
            assert getattr(info.value, "code", None) == ErrorCode.VERSION_MISMATCH


# --- item 2: §9.1 error codes (§7.10) ----------------------------------------------------


async def test_device_method_error_codes(
    config: ServerConfig, data_dir: Path, tmp_path: Path
) -> None:
    publish(data_dir, tmp_path, "1.1")  # stays a draft
    publish(data_dir, tmp_path, "1.2")
    approve_in_store(data_dir, "1.2")
    with trio.fail_after(10):
        async with running_releaser(config) as server, wire(server.port) as w:
            assert isinstance(await _authenticate(w, _hello()), ResponseReceived)
            cases: list[tuple[str, object, ErrorCode]] = [
                ("get_manifest", GetManifest(app="demo", version="1.1"), ErrorCode.UNAVAILABLE),
                (
                    "get_chunks",
                    GetChunks(app="demo", version="1.1", chunks=[(0, 0)]),
                    ErrorCode.UNAVAILABLE,
                ),
                ("get_manifest", GetManifest(app="demo", version="9.9"), ErrorCode.NOT_FOUND),
                (
                    "get_chunks",
                    GetChunks(app="demo", version="1.2", chunks=[(5, 0)]),
                    ErrorCode.INVALID_PARAMS,
                ),
                (
                    "get_chunks",
                    GetChunks(app="demo", version="1.2", chunks=[(0, 7)]),
                    ErrorCode.INVALID_PARAMS,
                ),
                ("check_update", CheckUpdate(app="other", version="1.0"), ErrorCode.FORBIDDEN),
                ("get_manifest", GetManifest(app="other", version="1.2"), ErrorCode.FORBIDDEN),
            ]
            for method, params, code in cases:
                answer = await w.request(method, params)
                assert isinstance(answer, ErrorReceived), (method, params)
                assert answer.code == code, (method, params, answer)
            answer = await w.request("get_manifest", GetManifest(app="demo", version="1.2"))
            assert isinstance(answer, ResponseReceived)


# --- item 3: a malformed bye is answered by bye 1002 (§3.3) ------------------------------


async def test_bye_without_its_code_is_answered_by_bye_1002(config: ServerConfig) -> None:
    with trio.fail_after(10):
        async with running_releaser(config) as server, wire(server.port) as w:
            assert isinstance(await _authenticate(w, _hello()), ResponseReceived)
            await w.send(_raw([3, "bye", {"reason": "x"}]))
            closed = await w.until_closed()
            assert closed.code == CloseCode.PROTOCOL_ERROR
            assert closed.reason == "bye: missing field 'code'"


# --- item 4: the heartbeat starts at OPEN, not at the handshake deadline (§6.2) -----------


@pytest.mark.parametrize(
    ("heartbeat", "handshake_timeout"), [(1.0, 4.0), (2.0, 7.0)], ids=["1/4", "2/7"]
)
async def test_a_peer_that_only_answers_pings_stays_connected(
    config: ServerConfig, heartbeat: float, handshake_timeout: float
) -> None:
    # Before the fix the releaser's reader slept on the handshake deadline it
    # computed before the auth answer opened the connection, then found the
    # peer silent for 3 heartbeats and dropped it (1012) without a ping.
    config = attrs.evolve(config, heartbeat=heartbeat, handshake_timeout=handshake_timeout)
    with trio.fail_after(handshake_timeout + 10):
        async with running_releaser(config) as server, wire(server.port) as w:
            assert isinstance(await _authenticate(w, _hello()), ResponseReceived)
            opened = trio.current_time()
            await w.pump(lambda _: False, handshake_timeout + 1.5)
            assert not w.eof, w.events
            assert not any(isinstance(e, ConnectionClosed) for e in w.events)
            assert w.pings, "no heartbeat ping"
            assert w.pings[0] - opened < heartbeat + 0.75  # one heartbeat after OPEN
            answer = await w.request("status", Empty())
            assert isinstance(answer, ResponseReceived)


# --- item 5: short reasons -----------------------------------------------------------------


async def test_invalid_hello_field_reason_is_a_sentence(config: ServerConfig) -> None:
    with trio.fail_after(10):
        async with running_releaser(config) as server, wire(server.port) as w:
            hello = codec.to_wire(_hello())
            await w.send(_raw([0, 1, "hello", {**hello, "role": "admin"}]))
            closed = await w.until_closed()
            assert closed.code == CloseCode.PROTOCOL_ERROR
            assert closed.reason == "hello: role must be one of device, operator, got 'admin'"


async def test_unknown_progress_state_reason_is_a_sentence(config: ServerConfig) -> None:
    with trio.fail_after(10):
        async with running_releaser(config) as server, wire(server.port) as w:
            assert isinstance(await _authenticate(w, _hello()), ResponseReceived)
            await w.send(_raw([3, "update_progress", {"state": "dancing"}]))
            closed = await w.until_closed()
            assert closed.code == CloseCode.PROTOCOL_ERROR
            assert closed.reason.startswith("update_progress: state must be one of the 21 ")
            assert closed.reason.endswith("got 'dancing'")
            assert len(closed.reason) < 200


# --- item 6: check_update updates the registry; what status counts -------------------------


async def test_check_update_records_the_version_and_status_counts_known_devices(
    config: ServerConfig, operator_key: Ed25519PrivateKey
) -> None:
    with trio.fail_after(10):
        async with running_releaser(config) as server:
            async with connect(server.port, DEVICE_KEY, version="1.0") as dev:
                await dev.request("check_update", CheckUpdate(app="demo", version="1.1"))
            async with connect(server.port, operator_key, role="operator", peer_id="ops") as op:
                [info] = (await op.request("list_devices", DeviceFilter())).devices
                assert (info.version, info.connected) == ("1.1", False)
                status = await op.request("status", Empty())
                # §7.9 StatusResult: connected counts live device connections;
                # by_version/by_state count every accepted device, connected or not.
                assert status.connected == 0
                assert status.by_version == {"1.1": 1}
                assert status.by_state == {"idle": 1}


# --- item 7: the blake3 capability is honoured (§7.2) ---------------------------------------


async def test_blake3_release_only_for_devices_announcing_it(
    config: ServerConfig, data_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("blake3")
    publish(data_dir, tmp_path, "1.1", hash_algorithm="blake3")
    approve_in_store(data_dir, "1.1")
    reason = (
        "release demo 1.1 uses blake3, which this device did not announce in its hello capabilities"
    )
    with trio.fail_after(10):
        async with running_releaser(config) as server:
            async with wire(server.port) as w:
                assert isinstance(await _authenticate(w, _hello()), ResponseReceived)
                for method, params in [
                    ("check_update", CheckUpdate(app="demo", version="1.0")),
                    ("get_manifest", GetManifest(app="demo", version="1.1")),
                    ("get_chunks", GetChunks(app="demo", version="1.1", chunks=[(0, 0)])),
                ]:
                    answer = await w.request(method, params)
                    assert isinstance(answer, ErrorReceived), method
                    assert (answer.code, answer.message) == (ErrorCode.UNAVAILABLE, reason)
            key = fixed_key(0x52)
            async with wire(server.port) as w:
                hello = _hello(key, peer_id="dev-2", capabilities=["blake3"])
                assert isinstance(await _authenticate(w, hello, key), ResponseReceived)
                answer = await w.request("check_update", CheckUpdate(app="demo", version="1.0"))
                assert isinstance(answer, ResponseReceived)
                assert (answer.result.available, answer.result.version) == (True, "1.1")
                answer = await w.request(
                    "get_chunks", GetChunks(app="demo", version="1.1", chunks=[(0, 0)])
                )
                assert isinstance(answer, ResponseReceived)


# --- item 8: PENDING carries {device_id} (§5.3, frames.json "error: with data") ------------


async def test_pending_error_carries_the_device_id(config: ServerConfig) -> None:
    config = attrs.evolve(config, enrollment="manual")
    with trio.fail_after(10):
        async with running_releaser(config) as server, wire(server.port) as w:
            answer = await _authenticate(w, _hello())
            assert isinstance(answer, ResponseReceived) and answer.result.status == "pending"
            answer = await w.request("check_update", CheckUpdate(app="demo", version="1.0"))
            assert isinstance(answer, ErrorReceived)
            assert answer.code == ErrorCode.PENDING
            assert answer.message == "device dev-1 is pending operator approval"
            assert answer.data == {"device_id": "dev-1"}
