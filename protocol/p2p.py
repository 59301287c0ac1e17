"""Peer-to-peer delivery: the tracker messages and the peer token (specs/PROTOCOL.md §7.11).

Devices on one LAN serve each other chunks of a release (issue 18). The
releaser is the tracker: ``get_peers`` names up to N near devices that hold
the release, with a short-lived *peer token* it signed. The asking device
presents that token on a device↔device link; the serving device checks it
with :func:`verify_peer_token` before it serves anything.

Why the token is signed by the root's ``timestamp`` role (§8.6): every device
that verifies freshness statements already holds those keys from its root, so
no new trust has to be distributed, and a stolen timestamp key still cannot
make a device install anything: chunks are checked against the manifest,
which needs the release keys (§8.2). A device whose root has no timestamp
role can neither ask for peers nor serve them (the releaser answers
``get_peers`` with no peers).

The messages are registered in :data:`fleetpush.protocol.messages.METHODS`
at import (``fleetpush.protocol`` imports this module), so messages.py, near
its size limit, stays as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from attrs import field, frozen
from attrs.validators import deep_iterable, instance_of, max_len, optional
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import codec, keys
from .errors import DecodeError, TrustError
from .limits import MAX_WIRE_INT
from .messages import METHODS, Empty, Kind, MethodSpec, Signature, SignedManifest
from .trust import TrustRoot, verify_signatures
from .validators import int_range

TOKEN_FORMAT: Final = 1
TOKEN_DOMAIN: Final = b"fleetpush-peer-token-v1\x00"
#: The role a device↔device link announces in ``hello`` (§5.1, §7.11).
PEER_ROLE: Final = "peer"
#: Most peers the releaser hands out at once; the default it hands out (§7.11).
MAX_PEERS: Final = 16
DEFAULT_PEERS: Final = 4
#: Longest token life the releaser issues (seconds): long enough for one
#: release download, short enough that a device removed from the fleet loses
#: access to its neighbours within minutes.
MAX_TOKEN_LIFE: Final = 3600
#: Why a device reports a peer (``report_peer``).
REPORT_REASONS: Final = ("corrupt", "refused", "silent")
_PORT: Final = int_range(1, 65535)


class PeerTokenError(TrustError):
    """A peer token is malformed, expired, or does not authorise this link (§7.11)."""


# --- tracker messages (§7.11) -------------------------------------------------


@frozen(kw_only=True)
class GetPeers:
    app: str = field(validator=max_len(128))
    version: str = field(validator=max_len(128))
    #: the device's LAN as it sees it (e.g. "192.168.4.0/24"); with the public
    #: address the releaser sees, it decides who is "near".
    subnet: str | None = field(default=None, validator=optional(max_len(64)))
    #: the LAN address it serves peers on (absent: the address the releaser sees).
    host: str | None = field(default=None, validator=optional(max_len(255)))
    #: its own p2p port, if it serves (0: it does not).
    port: int = field(default=0, validator=int_range(0, 65535))


@frozen(kw_only=True)
class PeerAddr:
    device_id: str = field(validator=max_len(128))
    host: str = field(validator=max_len(255))
    port: int = field(validator=_PORT)


@frozen(kw_only=True)
class PeerList:
    peers: list[PeerAddr] = field(
        factory=list, validator=[max_len(MAX_PEERS), deep_iterable(instance_of(PeerAddr))]
    )
    #: the signed :class:`PeerToken`; None when there are no peers.
    token: SignedManifest | None = None


@frozen(kw_only=True)
class ReportPeer:
    app: str = field(validator=max_len(128))
    version: str = field(validator=max_len(128))
    peer_id: str = field(validator=max_len(128))
    reason: str = field(validator=max_len(32))
    #: bytes received from peers / from the releaser for this release so far.
    peer_bytes: int = field(default=0, validator=int_range(0, MAX_WIRE_INT))


@frozen(kw_only=True)
class PeerBytes:
    """A finished download's split (notification): bytes from peers vs the releaser."""

    app: str = field(validator=max_len(128))
    version: str = field(validator=max_len(128))
    from_peers: int = field(validator=int_range(0, MAX_WIRE_INT))
    from_releaser: int = field(validator=int_range(0, MAX_WIRE_INT))


@frozen(kw_only=True)
class PresentToken:
    """Sent by the asking device on a device↔device link, right after ``auth``."""

    app: str = field(validator=max_len(128))
    version: str = field(validator=max_len(128))
    token: SignedManifest


# --- the token (§7.11) --------------------------------------------------------


@frozen(kw_only=True)
class PeerToken:
    format: int = TOKEN_FORMAT
    server_id: str
    issued: int
    expires: int
    #: the device allowed to ask, and the key it must prove on the link.
    asker: str
    asker_key: bytes
    app: str
    version: str
    #: the devices it may ask; a serving device not named here refuses.
    peers: list[str] = field(factory=list)
    extra: dict[str, Any] = field(factory=dict)

    def to_bytes(self) -> bytes:
        validate(self)
        return codec.packb(codec.to_wire(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerToken:
        """Raises :class:`PeerTokenError`."""
        try:
            t = codec.from_wire(cls, codec.unpackb(data), "peer token")
        except DecodeError as e:
            raise PeerTokenError(f"malformed peer token: {e}") from e
        validate(t)
        return t


def validate(t: PeerToken) -> None:
    """The structural rules of §7.11. Raises :class:`PeerTokenError`."""
    if t.format != TOKEN_FORMAT:
        raise PeerTokenError(f"peer token format {t.format} is not supported")
    if not (0 <= t.issued <= t.expires <= MAX_WIRE_INT):
        raise PeerTokenError("peer token times are out of order or range")
    if t.expires - t.issued > MAX_TOKEN_LIFE:
        raise PeerTokenError(f"peer token lives longer than {MAX_TOKEN_LIFE} s")
    if len(t.asker_key) != 32:
        raise PeerTokenError("peer token asker_key must be a 32-byte Ed25519 key")
    if not t.peers or len(t.peers) > MAX_PEERS:
        raise PeerTokenError(f"peer token must name 1 to {MAX_PEERS} peers")
    if t.asker in t.peers:
        raise PeerTokenError("peer token names the asker as its own peer")


def sign_peer_token(t: PeerToken, signers: Iterable[Ed25519PrivateKey]) -> SignedManifest:
    raw = t.to_bytes()
    sigs = [Signature(keyid=keys.keyid(k), sig=keys.sign(k, TOKEN_DOMAIN, raw)) for k in signers]
    return SignedManifest(signed=raw, signatures=sigs)


def verify_peer_token(
    trust: TrustRoot,
    signed: SignedManifest,
    *,
    me: str,
    asker: str,
    asker_key: bytes,
    app: str,
    version: str,
    now: float,
) -> PeerToken:
    """Apply §7.11 on the serving side, in order, and return the token.

    ``trust`` holds the root's timestamp keys. 1. their threshold signed the
    exact bytes; 2. they decode to a valid token; 3. it names this serving
    device ``me``; 4. it names the asking device and the key it proved in the
    handshake; 5. it is for the release asked about; 6. ``now`` is within
    ``[issued, expires)``.

    Raises BadSignature, UnknownKey, ThresholdNotMet, PeerTokenError.
    """
    verify_signatures(trust, signed, domain=TOKEN_DOMAIN, what="the peer token", role="timestamp")
    t = PeerToken.from_bytes(signed.signed)
    if me not in t.peers:
        raise PeerTokenError(f"the peer token does not name this device ({me})")
    if t.asker != asker or t.asker_key != asker_key:
        raise PeerTokenError(f"the peer token was issued to {t.asker}, not to {asker}")
    if (t.app, t.version) != (app, version):
        raise PeerTokenError(f"the peer token is for {t.app} {t.version}, not {app} {version}")
    if now < t.issued:
        raise PeerTokenError(f"the peer token is not valid before {t.issued}")
    if now >= t.expires:
        raise PeerTokenError(f"the peer token expired at {t.expires}")
    return t


# Requests a device sends (§7.9, §7.11).
METHODS.update(
    {
        "get_peers": MethodSpec("get_peers", Kind.REQUEST, GetPeers, PeerList, "device"),
        "report_peer": MethodSpec("report_peer", Kind.REQUEST, ReportPeer, Empty, "device"),
        "p2p_bytes": MethodSpec("p2p_bytes", Kind.NOTIFICATION, PeerBytes, None, "device"),
        # Device -> serving device, on a peer link only (the releaser refuses it).
        "present_token": MethodSpec("present_token", Kind.REQUEST, PresentToken, Empty, "device"),
    }
)

__all__ = [
    "DEFAULT_PEERS",
    "MAX_PEERS",
    "MAX_TOKEN_LIFE",
    "PEER_ROLE",
    "REPORT_REASONS",
    "TOKEN_DOMAIN",
    "GetPeers",
    "PeerAddr",
    "PeerBytes",
    "PeerList",
    "PeerToken",
    "PeerTokenError",
    "PresentToken",
    "ReportPeer",
    "sign_peer_token",
    "validate",
    "verify_peer_token",
]
