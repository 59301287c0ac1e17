"""The connecting side of the handshake (specs/PROTOCOL.md §5) over a :class:`~.peer.Peer`.

Its own module so that peer.py stays the transport; ``fleetpush.net.peer``
still exports :func:`client_handshake`.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetpush.protocol import auth_payload, sign_challenge
from fleetpush.protocol.messages import Auth, AuthResult, Hello, HelloResult


class Requester(Protocol):
    """What the handshake needs of a :class:`~.peer.Peer` (no import: no cycle)."""

    async def request(self, method: str, params: object, *, timeout: float = ...) -> Any: ...


async def client_handshake(
    peer: Requester,
    key: Ed25519PrivateKey,
    hello: Hello,
    *,
    timeout: float = 10.0,
) -> tuple[HelloResult, AuthResult]:
    """Run the connecting side of the handshake (specs/PROTOCOL.md §5).

    Sends ``hello``, signs the releaser's nonce with ``key`` and sends
    ``auth``. Raises :class:`RpcError` (version mismatch, auth refused, device
    rejected), :class:`PeerClosed`, or ``trio.TooSlowError`` after ``timeout``.
    """
    with trio.fail_after(timeout):
        hello_result: HelloResult = await peer.request("hello", hello)
        payload = auth_payload(
            server_id=hello_result.server_id,
            cid=hello_result.cid,
            nonce=hello_result.nonce,
            role=hello.role,
            peer_id=hello.peer_id,
            public_key=hello.public_key,
        )
        auth_result: AuthResult = await peer.request(
            "auth", Auth(signature=sign_challenge(key, payload))
        )
    return hello_result, auth_result
