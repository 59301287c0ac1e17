"""Key generation: the one place that draws Ed25519 keys from the OS's randomness.

``fleetpush.protocol`` promises no randomness (specs/PROTOCOL.md §1), so its
``keys`` module only derives, encodes and verifies keys; new keys are made
here, in the layer that does I/O, for the device session, ``fleetpush keygen``
and the bench.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def generate_private_key() -> Ed25519PrivateKey:
    """A new Ed25519 private key from the operating system's random source."""
    return Ed25519PrivateKey.generate()
