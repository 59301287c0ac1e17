"""Ed25519 keys, key ids, signing and verification (specs/PROTOCOL.md §8.1).

Pure functions over bytes; reading and writing key files is the adapters' job,
and so is making new keys (``fleetpush.net.keys``): this package draws no
randomness (specs/PROTOCOL.md §1).
A key id is the lowercase hex SHA-256 of the raw 32-byte public key.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import BadSignature, FleetpushError

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


class KeyFormatError(FleetpushError):
    """A key could not be decoded."""


def private_key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    """Deterministic key from a 32-byte seed (test vectors, specs/vectors/)."""
    try:
        return Ed25519PrivateKey.from_private_bytes(seed)
    except ValueError as e:
        raise KeyFormatError(f"bad Ed25519 seed: {e}") from e


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFormatError(f"not a PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError("the key is not an Ed25519 key")
    return key


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != PUBLIC_KEY_SIZE:
        raise KeyFormatError(f"an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes, got {len(raw)}")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise KeyFormatError(f"bad Ed25519 public key: {e}") from e


def public_key_from_hex(text: str) -> bytes:
    """Parse a hex public key as printed by ``fleetpush keygen``; returns raw bytes."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError as e:
        raise KeyFormatError(f"public key is not hex: {text!r}") from e
    public_key_from_bytes(raw)
    return raw


def keyid(public_key: bytes | Ed25519PublicKey | Ed25519PrivateKey) -> str:
    raw = public_key if isinstance(public_key, bytes) else public_bytes(public_key)
    return hashlib.sha256(raw).hexdigest()


def sign(key: Ed25519PrivateKey, domain: bytes, message: bytes) -> bytes:
    """Sign ``domain || message``; the domain separates manifest and auth signatures."""
    return key.sign(domain + message)


def verify(public_key: bytes, signature: bytes, domain: bytes, message: bytes) -> None:
    """Raise :class:`BadSignature` unless ``signature`` is valid for ``domain || message``."""
    try:
        public_key_from_bytes(public_key).verify(signature, domain + message)
    except (InvalidSignature, KeyFormatError, ValueError) as e:
        raise BadSignature(f"signature by key {keyid(public_key)[:16]} does not verify") from e
