"""Handshake authentication: what the peer signs (specs/PROTOCOL.md §5.2).

The releaser's ``hello`` result carries a fresh random nonce. The peer proves
it holds the private key for the public key it announced by signing::

    DOMAIN || msgpack([server_id, cid, nonce, role, peer_id, public_key])

Binding the server id and session id stops a signature from being replayed to
another releaser or another session; binding role and peer id stops a device
key from being used to act as an operator.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import codec, keys

DOMAIN: Final = b"fleetpush-auth-v1\x00"
NONCE_SIZE: Final = 32


def auth_payload(
    *, server_id: str, cid: str, nonce: bytes, role: str, peer_id: str, public_key: bytes
) -> bytes:
    return codec.packb([server_id, cid, nonce, role, peer_id, public_key])


def sign_challenge(key: Ed25519PrivateKey, payload: bytes) -> bytes:
    return keys.sign(key, DOMAIN, payload)


def verify_challenge(public_key: bytes, signature: bytes, payload: bytes) -> None:
    """Raise :class:`BadSignature` if the peer's answer to the nonce is wrong."""
    keys.verify(public_key, signature, DOMAIN, payload)
