"""Impersonation and replay on the wire against a real releaser (issue 6).

An eavesdropper on a plain-TCP link sees a device's ``hello`` and ``auth``.
Replaying that signature on a new session must fail (the nonce and the
session id are signed), and so must using a device key to speak as an
operator or a captured device id with another key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import PROTOCOL_VERSION, Connection, RpcError, Side, auth_payload
from fleetpush.protocol.auth import sign_challenge
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Auth, DeviceFilter, Hello, HelloResult
from fp_keys import DEVICE_KEY
from fp_releaser import releaser

from fleetpush.net.peer import Peer, PeerClosed, client_handshake, open_peer


def hello(key: Ed25519PrivateKey, peer_id: str = "dev-1", role: str = "device") -> Hello:
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        role=role,
        peer_id=peer_id,
        public_key=public_bytes(key),
        app="demo" if role == "device" else None,
        version="1.0.0" if role == "device" else None,
    )


async def _session(port: int, body: object) -> object:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = Connection(Side.CLIENT, now=trio.current_time())
    try:
        async with open_peer(stream, conn, name="t") as peer:
            return await body(peer)  # type: ignore[operator]
    except BaseExceptionGroup as group:
        leaves = group.exceptions
        while len(leaves) == 1 and isinstance(leaves[0], BaseExceptionGroup):
            leaves = leaves[0].exceptions
        raise leaves[0] from group


@pytest.fixture
async def port(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with releaser(tmp_path / "data", handshake_timeout=3.0) as handle:
        yield handle.port


async def test_replayed_auth_signature_is_refused_on_a_new_session(port: int) -> None:
    captured: dict[str, bytes] = {}

    async def honest(peer: Peer) -> None:
        h = hello(DEVICE_KEY)
        result: HelloResult = await peer.request("hello", h)
        payload = auth_payload(
            server_id=result.server_id, cid=result.cid, nonce=result.nonce,
            role=h.role, peer_id=h.peer_id, public_key=h.public_key,
        )  # fmt: skip
        captured["sig"] = sign_challenge(DEVICE_KEY, payload)
        await peer.request("auth", Auth(signature=captured["sig"]))
        captured["nonce"] = result.nonce

    async def replay(peer: Peer) -> None:
        # Same hello, the eavesdropped signature; no private key.
        result: HelloResult = await peer.request("hello", hello(DEVICE_KEY))
        assert result.nonce != captured["nonce"]  # a fresh challenge every session
        await peer.request("auth", Auth(signature=captured["sig"]))

    with trio.fail_after(10):
        await _session(port, honest)
        with pytest.raises((RpcError, PeerClosed)):
            await _session(port, replay)


async def test_device_id_with_another_key_is_refused(port: int) -> None:
    """Device impersonation: the registry binds the id to its first key."""
    with trio.fail_after(10):
        await _session(
            port, lambda p: client_handshake(p, DEVICE_KEY, hello(DEVICE_KEY), timeout=5)
        )
        thief = Ed25519PrivateKey.generate()
        with pytest.raises((RpcError, PeerClosed)):
            await _session(port, lambda p: client_handshake(p, thief, hello(thief), timeout=5))


async def test_device_key_cannot_speak_as_operator(port: int) -> None:
    """Operator impersonation: only keys in the releaser's config are operators."""

    async def as_operator(peer: Peer) -> object:
        await client_handshake(
            peer, DEVICE_KEY, hello(DEVICE_KEY, "ops", role="operator"), timeout=5
        )
        return await peer.request("list_devices", DeviceFilter(), timeout=5)

    with trio.fail_after(10), pytest.raises((RpcError, PeerClosed)):
        await _session(port, as_operator)


async def test_device_session_cannot_call_operator_methods(port: int) -> None:
    async def device_calls_push(peer: Peer) -> object:
        await client_handshake(peer, DEVICE_KEY, hello(DEVICE_KEY), timeout=5)
        return await peer.request("list_devices", DeviceFilter(), timeout=5)

    with trio.fail_after(10), pytest.raises((RpcError, PeerClosed)):
        await _session(port, device_calls_push)
