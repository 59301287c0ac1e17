"""Root documents: the rotating root of trust (specs/PROTOCOL.md §8.4, §8.5).

A root names the keys a device trusts for each role and how many of them must
sign: ``root`` (signs the next root), ``release`` (signs manifests, §8.2) and
``timestamp`` (signs freshness statements, §8.6). It is a canonical msgpack
map like a manifest (§3.2, §7.3), signed over ``ROOT_DOMAIN || signed``, and
travels in the same ``{signed, signatures}`` envelope as a manifest.

The rule is python-tuf's: root N+1 is trusted only if the threshold of root
N's root keys *and* the threshold of root N+1's own root keys signed its exact
bytes, and its version is exactly N+1. A device walks one version at a time
(at most :data:`MAX_ROOT_WALK` per update), never goes back to an older
version, and checks expiry only on the root it ends on (:func:`check_current`):
intermediate roots may have expired long ago, the newest may not.

Sans-IO like trust.py: bytes and facts in, a :class:`VerifiedRoot` or one
:class:`~fleetpush.protocol.errors.RootError` (or signature error) out. The
time is passed in; reading and persisting root files is the caller's job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from attrs import field, frozen
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import codec, keys
from .errors import DecodeError, ExpiredRoot, FleetpushError, RootError, RootRollback
from .limits import MAX_WIRE_INT
from .messages import Signature, SignedManifest
from .trust import TrustRoot, verify_signatures

ROOT_FORMAT: Final = 1
#: The signature domain of root documents (§8.3): a root signature is never a
#: manifest, freshness or handshake signature.
ROOT_DOMAIN: Final = b"fleetpush-root-v1\x00"
#: Root versions a device walks in one go (python-tuf's max_root_rotations).
MAX_ROOT_WALK: Final = 256
#: Bounds (§10): keys a root lists, apps it resets, signatures it carries.
MAX_ROOT_KEYS: Final = 64
MAX_RESETS: Final = 256
MAX_ROOT_SIGNATURES: Final = 64
ROLES: Final = ("root", "release", "timestamp")
#: The version of the implicit root of a device configured with bare ``trusted_keys``.
LEGACY_VERSION: Final = 0


@frozen(kw_only=True)
class Role:
    """The key ids trusted for one role and how many of them must sign."""

    keys: list[str]
    threshold: int


@frozen(kw_only=True)
class Root:
    format: int = ROOT_FORMAT
    version: int
    #: seconds since the epoch; the newest trusted root must not have expired (§8.4).
    expires: int
    #: key id -> raw 32-byte Ed25519 public key, for every key a role names.
    keys: dict[str, bytes]
    root: Role
    release: Role
    #: the releaser's online key for freshness statements (§8.6); None: none.
    timestamp: Role | None = field(default=None, metadata={codec.OMIT_NONE: True})
    #: app -> sequence: a device accepting this root lowers that app's
    #: high-water mark to at most this value (§8.5, recovery from a fast-forward).
    sequence_resets: dict[str, int] = field(factory=dict)
    extra: dict[str, Any] = field(factory=dict)

    def trust(self, role: str) -> TrustRoot:
        """The keys and threshold of ``role`` as a :class:`TrustRoot`.

        Raises :class:`RootError` for a role this root does not define.
        """
        r = self.role(role)
        return TrustRoot({k: self.keys[k] for k in r.keys}, r.threshold)

    def role(self, role: str) -> Role:
        found = {"root": self.root, "release": self.release, "timestamp": self.timestamp}.get(role)
        if found is None:
            raise RootError(f"root version {self.version} defines no {role} key")
        return found

    def to_bytes(self) -> bytes:
        """The canonical encoding: the bytes that get signed. Raises RootError."""
        validate(self)
        return codec.packb(codec.to_wire(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Root:
        """Decode and validate. Raises :class:`RootError`."""
        try:
            root = codec.from_wire(cls, codec.unpackb(data), "root")
        except DecodeError as e:
            raise RootError(f"malformed root: {e}") from e
        validate(root)
        return root


def validate(r: Root) -> None:
    """Every structural rule of §8.4. Raises :class:`RootError`."""
    if r.format != ROOT_FORMAT:
        raise RootError(f"root format {r.format} is not supported (this side reads {ROOT_FORMAT})")
    if not 1 <= r.version <= MAX_WIRE_INT:
        raise RootError(f"root version must be in 1..{MAX_WIRE_INT}, got {r.version}")
    if not 0 < r.expires <= MAX_WIRE_INT:
        raise RootError("root expires must be a positive time")
    if len(r.keys) > MAX_ROOT_KEYS:
        raise RootError(f"a root lists at most {MAX_ROOT_KEYS} keys")
    for kid, public in r.keys.items():
        if len(public) != keys.PUBLIC_KEY_SIZE or keys.keyid(public) != kid:
            raise RootError(f"key {kid[:16]} is not the SHA-256 of its 32-byte public key")
    for name in ROLES:
        role = {"root": r.root, "release": r.release, "timestamp": r.timestamp}[name]
        if role is None:
            continue
        if len(set(role.keys)) != len(role.keys):
            raise RootError(f"the {name} role names a key twice")
        missing = [k for k in role.keys if k not in r.keys]
        if missing:
            raise RootError(f"the {name} role names key {missing[0][:16]}, which the root lacks")
        if not 1 <= role.threshold <= len(role.keys):
            raise RootError(
                f"the {name} threshold {role.threshold} is not within 1..{len(role.keys)} keys"
            )
    if len(r.sequence_resets) > MAX_RESETS:
        raise RootError(f"a root resets at most {MAX_RESETS} apps")
    for app, seq in r.sequence_resets.items():
        if not app or len(app) > 128 or not 0 <= seq <= MAX_WIRE_INT:
            raise RootError(f"sequence_resets entry {app[:40]!r}: {seq} is out of range")


@frozen(kw_only=True)
class VerifiedRoot:
    """A root whose signatures and version passed §8.4, with its exact envelope."""

    root: Root
    #: None for the implicit legacy root (bare ``trusted_keys``).
    signed: SignedManifest | None


def legacy_root(release: TrustRoot) -> VerifiedRoot:
    """The implicit root v0 of a device configured with bare ``trusted_keys`` (§8.5).

    Its root and release roles are both the configured keys and threshold,
    and it never expires: root v1 is accepted by such a device when the
    threshold of those keys signed it too (the migration from ``trusted_keys``).
    """
    ids = sorted(release.keys)
    role = Role(keys=ids, threshold=release.threshold)
    root = Root(
        version=LEGACY_VERSION,
        expires=MAX_WIRE_INT,
        keys=dict(release.keys),
        root=role,
        release=role,
    )
    return VerifiedRoot(root=root, signed=None)


def _signers(root: Root, role: str, signed: SignedManifest, what: str) -> frozenset[str]:
    if len(signed.signatures) > MAX_ROOT_SIGNATURES:
        raise RootError(f"{what} carries more than {MAX_ROOT_SIGNATURES} signatures")
    return verify_signatures(root.trust(role), signed, domain=ROOT_DOMAIN, what=what, role=role)


def load_trusted_root(signed: SignedManifest) -> VerifiedRoot:
    """The root a device is provisioned with (or persisted): self-signed at its threshold.

    Like python-tuf's trusted root, it is trusted because it was installed,
    so it must be decoded before its own keys can check it; the signatures
    are still checked over the exact bytes. Raises RootError, BadSignature,
    UnknownKey, ThresholdNotMet.
    """
    root = Root.from_bytes(signed.signed)
    _signers(root, "root", signed, f"root version {root.version}")
    return VerifiedRoot(root=root, signed=signed)


def update_root(trusted: Root, signed: SignedManifest) -> VerifiedRoot:
    """Root ``trusted.version + 1`` from its envelope, or an error (§8.4, in this order).

    1. the trusted root's root role signed the exact bytes at its threshold;
    2. the bytes decode to a valid root;
    3. its version is above the trusted one (else :class:`RootRollback`) and
       exactly the next one (else :class:`RootError`);
    4. its own root role signed the same bytes at its own threshold.

    Expiry is not checked here (:func:`check_current`). Raises RootError,
    RootRollback, BadSignature, UnknownKey, ThresholdNotMet.
    """
    what = f"root version {trusted.version + 1}"
    _signers(trusted, "root", signed, f"{what} (checked by the trusted root {trusted.version})")
    new = Root.from_bytes(signed.signed)
    if new.version <= trusted.version:
        raise RootRollback(
            f"root version {new.version} is not above the trusted version {trusted.version}"
        )
    if new.version != trusted.version + 1:
        raise RootError(f"root version {new.version} does not follow version {trusted.version}")
    _signers(new, "root", signed, f"{what} (checked by its own root keys)")
    return VerifiedRoot(root=new, signed=signed)


def check_current(root: Root, now: float) -> None:
    """Raise :class:`ExpiredRoot` if ``root``, the newest trusted one, expired at ``now``.

    python-tuf refuses every update under an expired final root; so does a
    device: a release is not installed under it, but newer roots are still
    walked, so publishing a fresh root recovers the fleet (§8.4).
    """
    if now >= root.expires:
        raise ExpiredRoot(
            f"the trusted root version {root.version} expired at {root.expires}: "
            "an operator must publish a newer root"
        )


def sequence_reset(root: Root, app: str, high_water: int) -> int | None:
    """The lowered high-water mark ``root`` orders for ``app``, or None (§8.5).

    A reset only ever lowers the mark (``min``); it applies once, when the
    device accepts this root by walking to it.
    """
    value = root.sequence_resets.get(app)
    if value is None or value >= high_water:
        return None
    return value


def sign_root(signed: bytes, signers: Iterable[Ed25519PrivateKey]) -> SignedManifest:
    """Sign canonical root bytes with each key (offline, by root-key holders)."""
    sigs = [Signature(keyid=keys.keyid(k), sig=keys.sign(k, ROOT_DOMAIN, signed)) for k in signers]
    return SignedManifest(signed=signed, signatures=sigs)


def add_root_signatures(
    envelope: SignedManifest, signers: Iterable[Ed25519PrivateKey]
) -> SignedManifest:
    """``envelope`` with each key's signature added (replacing that key's older one)."""
    new = sign_root(envelope.signed, signers).signatures
    ids = {s.keyid for s in new}
    kept = [s for s in envelope.signatures if s.keyid not in ids]
    return SignedManifest(signed=envelope.signed, signatures=[*kept, *new])


# --- the root file (``root-N.json``, §8.5) --------------------------------------


def envelope_to_json(envelope: SignedManifest) -> bytes:
    """The file form of a signed root: JSON, bytes in hex, one key per line."""
    doc = {
        "signed": envelope.signed.hex(),
        "signatures": [{"keyid": s.keyid, "sig": s.sig.hex()} for s in envelope.signatures],
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def envelope_from_json(data: bytes) -> SignedManifest:
    """Parse a root file. Raises :class:`RootError` naming what is wrong."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, Mapping) or not isinstance(doc.get("signatures"), list):
            raise ValueError("expected {signed, signatures}")
        sigs = [
            Signature(keyid=str(s["keyid"]), sig=bytes.fromhex(s["sig"])) for s in doc["signatures"]
        ]
        return SignedManifest(signed=bytes.fromhex(doc["signed"]), signatures=sigs)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, FleetpushError) as e:
        raise RootError(f"not a root file: {e}") from e


def describe(root: Root) -> dict[str, Any]:
    """A JSON-clean view of ``root`` for people and ``fleetpush root show --json``."""

    def role(r: Role | None) -> dict[str, Any] | None:
        if r is None:
            return None
        return {"threshold": r.threshold, "keys": {k: root.keys[k].hex() for k in r.keys}}

    return {
        "version": root.version,
        "expires": root.expires,
        "root": role(root.root),
        "release": role(root.release),
        "timestamp": role(root.timestamp),
        "sequence_resets": dict(root.sequence_resets),
    }


__all__ = [
    "LEGACY_VERSION",
    "MAX_ROOT_WALK",
    "ROOT_DOMAIN",
    "ROOT_FORMAT",
    "Role",
    "Root",
    "VerifiedRoot",
    "add_root_signatures",
    "check_current",
    "describe",
    "envelope_from_json",
    "envelope_to_json",
    "legacy_root",
    "load_trusted_root",
    "sequence_reset",
    "sign_root",
    "update_root",
    "validate",
]
