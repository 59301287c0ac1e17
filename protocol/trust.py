"""Trust rules for manifests, in one pure module (specs/PROTOCOL.md §8).

Like python-tuf's ``TrustedMetadataSet``: callers hand in the bytes they
received and the facts they know (trusted keys, threshold, the persisted
sequence high-water mark, the installed version, the time), and get back a
:class:`VerifiedManifest` or one specific :class:`TrustError`. Nothing here
reads files or clocks; persisting the new high-water mark atomically is the
caller's job (fleetpush.client.state).

Order of checks (§8.2): signatures over the exact bytes first, then decoding,
then app, expiry, rollback, and min_version.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import field, frozen

from . import keys
from .errors import (
    BadSignature,
    ExpiredManifest,
    MinVersionNotMet,
    RollbackRefused,
    ThresholdNotMet,
    UnknownKey,
    WrongApp,
)
from .manifest import DOMAIN, Manifest
from .messages import SignedManifest
from .versions import parse_version


@frozen
class TrustRoot:
    """Trusted release keys (key id -> raw public key) and the signature threshold."""

    keys: Mapping[str, bytes]
    threshold: int = field(default=1)

    @threshold.validator
    def _check(self, _attr: object, value: int) -> None:
        if value < 1:
            raise ValueError("threshold must be at least 1")
        if value > len(self.keys):
            raise ValueError(f"threshold {value} exceeds the {len(self.keys)} trusted keys")

    @classmethod
    def from_public_keys(cls, public_keys: list[bytes], threshold: int = 1) -> TrustRoot:
        return cls({keys.keyid(k): k for k in public_keys}, threshold)


@frozen
class VerifiedManifest:
    manifest: Manifest
    signed: SignedManifest
    #: key ids whose signatures verified.
    signers: frozenset[str]
    #: True if the manifest's sequence is above the previous high-water mark.
    advances: bool


def verify_signatures(
    root: TrustRoot,
    signed: SignedManifest,
    *,
    domain: bytes = DOMAIN,
    what: str = "the manifest",
    role: str = "release",
) -> frozenset[str]:
    """Return the distinct trusted key ids that signed; raise if below threshold.

    A signature from a trusted key that fails to verify is an attack, not
    noise: it raises :class:`BadSignature` even if the threshold is met by
    others. Signatures from unknown keys are ignored. ``domain``, ``what``
    and ``role`` let root documents (root.py, §8.4) and freshness statements
    (freshness.py, §8.6) use the same rule under their own signature domain.
    """
    good: set[str] = set()
    for sig in signed.signatures:
        public = root.keys.get(sig.keyid)
        if public is None:
            continue
        keys.verify(public, sig.sig, domain, signed.signed)
        good.add(sig.keyid)
    if not good:
        if signed.signatures:
            raise UnknownKey(f"{what} is not signed by any trusted {role} key")
        raise BadSignature(f"{what} carries no signatures")
    if len(good) < root.threshold:
        # The manifest's sentence is the one operators know (tests/cli/test_cli_errors.py).
        prefix = "" if role == "release" else f"{what}: "
        raise ThresholdNotMet(
            f"{prefix}{len(good)} trusted signature(s), {root.threshold} required"
        )
    return frozenset(good)


def verify_manifest(
    root: TrustRoot,
    signed: SignedManifest,
    *,
    app: str,
    high_water: int,
    now: float,
    installed_version: str | None,
) -> VerifiedManifest:
    """Apply every trust rule of §8.2 and return the verified manifest.

    Raises: BadSignature, UnknownKey, ThresholdNotMet (signatures);
    ManifestError, BadPath (content); WrongApp; ExpiredManifest;
    RollbackRefused (sequence below ``high_water``); MinVersionNotMet.
    A sequence equal to ``high_water`` verifies with ``advances=False``: the
    caller treats it as a no-op (already have it) or a resume.
    """
    signers = verify_signatures(root, signed)
    manifest = Manifest.from_bytes(signed.signed)
    if manifest.app != app:
        raise WrongApp(f"manifest is for app {manifest.app!r}, this device runs {app!r}")
    if manifest.expires is not None and now >= manifest.expires:
        raise ExpiredManifest(f"manifest {manifest.version} expired at {manifest.expires}")
    if manifest.sequence < high_water:
        raise RollbackRefused(
            f"manifest sequence {manifest.sequence} is below the trusted {high_water}"
        )
    if (
        manifest.min_version is not None
        and installed_version is not None
        and parse_version(installed_version) < parse_version(manifest.min_version)
    ):
        raise MinVersionNotMet(
            f"installed {installed_version} is below min_version {manifest.min_version}"
        )
    return VerifiedManifest(manifest, signed, signers, manifest.sequence > high_water)
