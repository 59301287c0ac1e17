"""Fixed-seed Ed25519 keys for tests: the same keys on every run (STYLE.md §5).

A plain module on pytest's pythonpath (pyproject ``[tool.pytest.ini_options]``),
named ``fp_*`` so it can never shadow a real module. Tests that need a key of
their own take ``fixed_key(n)`` with a seed byte nobody else uses; the roles
every suite needs have one key each here.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol.keys import private_key_from_seed, public_bytes


def fixed_key(seed: int | str) -> Ed25519PrivateKey:
    """The key whose 32-byte seed is ``bytes([seed]) * 32``, or the SHA-256 of a label.

    Raises ValueError if an int seed is not a byte (0-255).
    """
    raw = hashlib.sha256(seed.encode()).digest() if isinstance(seed, str) else bytes([seed]) * 32
    return private_key_from_seed(raw)


def key_hex(key: Ed25519PrivateKey) -> str:
    """The public key as ``fleetpush keygen`` prints it (and config files hold it)."""
    return public_bytes(key).hex()


#: Signs the releases the devices trust.
RELEASE_KEY = fixed_key(0x01)
#: A second release key: a manifest signed by it alone is not trusted.
OTHER_KEY = fixed_key(0x02)
#: The operator console's key, accepted by the test releasers.
OPERATOR_KEY = fixed_key(0x09)
#: A device's identity key (the one specs/vectors' device uses too).
DEVICE_KEY = fixed_key(0xD0)
