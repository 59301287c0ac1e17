"""Freshness statements and signed commands (specs/PROTOCOL.md §8.6).

The releaser holds an online *timestamp* key, listed in the root's
``timestamp`` role, and signs a small statement: the newest release sequence
per app and channel, a counter that never goes down, an expiry, and the nonce
the device sent (in ``hello``, or in ``get_freshness``). A push command
carries a statement whose ``command`` is the digest of that command, bound to
the connection's hello nonce, so a man in the middle of a plain-TCP link
cannot inject or alter one (§7.4).

What each guarantees, with the timestamp key alone stolen: a device can be
told "nothing new" for at most ``expires - issued``; it installs nothing,
since manifests need the release keys (§8.2).

Sans-IO like trust.py: :func:`verify_freshness` takes the bytes received and
the facts known (timestamp keys, expected nonce, last counter, time) and
returns the :class:`Freshness` or raises one
:class:`~fleetpush.protocol.errors.FreshnessError` (or a signature error).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Final

from attrs import field, frozen
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import codec, keys
from .errors import DecodeError, FreshnessError, StaleFreshness
from .limits import MAX_WIRE_INT
from .messages import Signature, SignedManifest, UpdateCommand
from .trust import TrustRoot, verify_signatures

FRESHNESS_FORMAT: Final = 1
FRESHNESS_DOMAIN: Final = b"fleetpush-freshness-v1\x00"
COMMAND_DOMAIN: Final = b"fleetpush-command-v1\x00"
NONCE_SIZE: Final = 32
#: Bounds (§10): apps and channels one statement lists.
MAX_APPS: Final = 64
MAX_CHANNELS: Final = 16


@frozen(kw_only=True)
class Freshness:
    format: int = FRESHNESS_FORMAT
    #: the releaser that signed it (informational; the key is what counts).
    server_id: str
    #: never lower than the previous statement the device accepted (§8.6, rule 4).
    counter: int
    issued: int
    expires: int
    #: the device's nonce this statement answers (§8.6, rule 3).
    nonce: bytes
    #: app -> channel -> the newest release sequence the releaser offers there.
    sequences: dict[str, dict[str, int]] = field(factory=dict)
    #: :func:`command_digest` of the push this statement authorises; None: none.
    command: bytes | None = field(default=None, metadata={codec.OMIT_NONE: True})
    extra: dict[str, Any] = field(factory=dict)

    def promised(self, app: str, channel: str) -> int | None:
        """The sequence this statement says is current for ``app`` on ``channel``."""
        return self.sequences.get(app, {}).get(channel)

    def to_bytes(self) -> bytes:
        validate(self)
        return codec.packb(codec.to_wire(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Freshness:
        """Raises :class:`FreshnessError`."""
        try:
            f = codec.from_wire(cls, codec.unpackb(data), "freshness")
        except DecodeError as e:
            raise FreshnessError(f"malformed freshness statement: {e}") from e
        validate(f)
        return f


def validate(f: Freshness) -> None:
    """The structural rules of §8.6. Raises :class:`FreshnessError`."""
    if f.format != FRESHNESS_FORMAT:
        raise FreshnessError(f"freshness format {f.format} is not supported")
    for name in ("counter", "issued", "expires"):
        if not 0 <= getattr(f, name) <= MAX_WIRE_INT:
            raise FreshnessError(f"freshness {name} is out of range")
    if f.expires < f.issued:
        raise FreshnessError("freshness expires before it was issued")
    if len(f.nonce) != NONCE_SIZE:
        raise FreshnessError(f"freshness nonce must be {NONCE_SIZE} bytes")
    if f.command is not None and len(f.command) != 32:
        raise FreshnessError("freshness command digest must be 32 bytes")
    if len(f.sequences) > MAX_APPS or any(len(c) > MAX_CHANNELS for c in f.sequences.values()):
        raise FreshnessError("freshness lists too many apps or channels")
    for channels in f.sequences.values():
        if any(not 0 <= s <= MAX_WIRE_INT for s in channels.values()):
            raise FreshnessError("freshness sequence out of range")


def command_digest(method: str, cmd: UpdateCommand) -> bytes:
    """SHA-256 over ``COMMAND_DOMAIN || msgpack([method, app, version, restart, push_id])``."""
    body = codec.packb([method, cmd.app, cmd.version, cmd.restart, cmd.push_id])
    return hashlib.sha256(COMMAND_DOMAIN + body).digest()


def sign_freshness(f: Freshness, signers: Iterable[Ed25519PrivateKey]) -> SignedManifest:
    raw = f.to_bytes()
    sigs = [
        Signature(keyid=keys.keyid(k), sig=keys.sign(k, FRESHNESS_DOMAIN, raw)) for k in signers
    ]
    return SignedManifest(signed=raw, signatures=sigs)


def verify_freshness(
    trust: TrustRoot,
    signed: SignedManifest,
    *,
    nonce: bytes,
    last_counter: int,
    now: float,
    command: bytes | None = None,
) -> Freshness:
    """Apply §8.6 in order and return the statement.

    1. the timestamp role's threshold signed the exact bytes;
    2. they decode to a valid statement;
    3. its nonce is the one this device sent (else a replay: FreshnessError);
    4. its counter is not below ``last_counter`` (else FreshnessError);
    5. with ``command``: it names exactly that command (else FreshnessError);
    6. ``now`` is before ``expires`` (else :class:`StaleFreshness`).

    Raises BadSignature, UnknownKey, ThresholdNotMet, FreshnessError, StaleFreshness.
    """
    verify_signatures(
        trust, signed, domain=FRESHNESS_DOMAIN, what="the freshness statement", role="timestamp"
    )
    f = Freshness.from_bytes(signed.signed)
    if f.nonce != nonce:
        raise FreshnessError("the freshness statement answers another nonce (a replay)")
    if f.counter < last_counter:
        raise FreshnessError(
            f"the freshness counter went back from {last_counter} to {f.counter} (a replay)"
        )
    if command is not None and f.command != command:
        raise FreshnessError("the command is not the one the timestamp key signed")
    if now >= f.expires:
        raise StaleFreshness(f"the freshness statement expired at {f.expires}")
    return f


def check_promise(f: Freshness, *, app: str, channel: str, sequence: int) -> None:
    """Raise :class:`FreshnessError` if ``sequence`` is older than ``f`` promised (§8.6)."""
    promised = f.promised(app, channel)
    if promised is not None and sequence < promised:
        raise FreshnessError(
            f"sequence {sequence} is older than the {promised} the releaser's signed "
            "freshness statement promised"
        )


__all__ = [
    "COMMAND_DOMAIN",
    "FRESHNESS_DOMAIN",
    "NONCE_SIZE",
    "Freshness",
    "check_promise",
    "command_digest",
    "sign_freshness",
    "validate",
    "verify_freshness",
]
