"""Trust rule scenarios, python-tuf style: one prose key per case (specs/PROTOCOL.md §8)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from fleetpush.protocol import (
    BadPath,
    BadSignature,
    ExpiredManifest,
    FileEntry,
    Manifest,
    ManifestError,
    MinVersionNotMet,
    RollbackRefused,
    ThresholdNotMet,
    TrustError,
    TrustRoot,
    UnknownKey,
    WrongApp,
    codec,
    keys,
    sign_manifest,
    verify_manifest,
)
from fleetpush.protocol import messages as m
from fleetpush.protocol.manifest import DOMAIN
from fp_keys import fixed_key

A, B, C, STRANGER = (fixed_key(i) for i in (1, 2, 3, 4))
ROOT = TrustRoot.from_public_keys([keys.public_bytes(k) for k in (A, B, C)], threshold=2)
NOW = 1_767_225_600.0
HIGH_WATER = 10


def _file(path: str, data: bytes = b"content") -> FileEntry:
    digest = hashlib.sha256(data).digest()
    return FileEntry(path=path, size=len(data), mode=0o644, digest=digest, chunks=[digest])


def _manifest(**changes: Any) -> Manifest:
    base = Manifest(
        app="thermo",
        version="2.0",
        sequence=HIGH_WATER + 1,
        created=int(NOW) - 60,
        expires=int(NOW) + 3600,
        min_version="1.5",
        chunk_size=4096,
        files=[_file("bin/thermo"), _file("etc/thermo.toml")],
    )
    return attrs.evolve(base, **changes)


def _raw_bytes(manifest: Manifest) -> bytes:
    # Canonical encoding *without* validation, as a careless or hostile but
    # trusted signer could produce it.
    return codec.packb(codec.to_wire(manifest))


def _paths(*paths: str) -> bytes:
    return _raw_bytes(_manifest(files=[_file(p) for p in paths]))


def _signed(
    data: bytes | Manifest | None = None, signers: tuple[Any, ...] = (A, B)
) -> m.SignedManifest:
    if data is None:
        data = _manifest()
    raw = data.to_bytes() if isinstance(data, Manifest) else data
    return sign_manifest(raw, signers)


def _tampered() -> m.SignedManifest:
    good = _signed()
    return m.SignedManifest(
        signed=good.signed.replace(b"thermo.toml", b"thermo.tomk"), signatures=good.signatures
    )


def _sig_over_other_bytes() -> m.SignedManifest:
    good = _signed()
    other = _signed(_manifest(notes="something else"), (A,))
    return m.SignedManifest(
        signed=good.signed, signatures=[other.signatures[0], good.signatures[1]]
    )


def _third_sig_bad() -> m.SignedManifest:
    good = _signed(signers=(A, B))
    forged = m.Signature(keyid=keys.keyid(C), sig=b"\x00" * 64)
    return m.SignedManifest(signed=good.signed, signatures=[*good.signatures, forged])


def _no_domain() -> m.SignedManifest:
    raw = _manifest().to_bytes()
    sigs = [m.Signature(keyid=keys.keyid(k), sig=k.sign(raw)) for k in (A, B)]
    return m.SignedManifest(signed=raw, signatures=sigs)


def _same_key_twice() -> m.SignedManifest:
    once = _signed(signers=(A,))
    return m.SignedManifest(signed=once.signed, signatures=once.signatures * 2)


def _mislabelled() -> m.SignedManifest:
    # B's valid signature presented under A's key id.
    good = _signed(signers=(B,))
    return m.SignedManifest(
        signed=good.signed,
        signatures=[m.Signature(keyid=keys.keyid(A), sig=good.signatures[0].sig)],
    )


Case = tuple[Callable[[], m.SignedManifest], dict[str, Any], type[Exception] | None]

SCENARIOS: dict[str, Case] = {
    "good: 2-of-3 signed, sequence above the high-water mark": (_signed, {}, None),
    "good: all three keys signed": (lambda: _signed(signers=(A, B, C)), {}, None),
    "good: an unknown key's signature next to enough trusted ones is ignored": (
        lambda: _signed(signers=(A, STRANGER, B)),
        {},
        None,
    ),
    "bad signature: the signed bytes were changed after signing": (_tampered, {}, BadSignature),
    "bad signature: one trusted signature is over other bytes": (
        _sig_over_other_bytes,
        {},
        BadSignature,
    ),
    "bad signature: threshold met but a third trusted signature is bad": (
        _third_sig_bad,
        {},
        BadSignature,
    ),
    "bad signature: signed without the domain string": (_no_domain, {}, BadSignature),
    "bad signature: a valid signature under another key's id": (_mislabelled, {}, BadSignature),
    "bad signature: no signatures at all": (lambda: _signed(signers=()), {}, BadSignature),
    "below threshold: 2-of-3 with one signature": (
        lambda: _signed(signers=(A,)),
        {},
        ThresholdNotMet,
    ),
    "below threshold: the same key twice counts once": (_same_key_twice, {}, ThresholdNotMet),
    "unknown key: only an untrusted key signed": (
        lambda: _signed(signers=(STRANGER,)),
        {},
        UnknownKey,
    ),
    "rollback: sequence below the high-water mark": (
        lambda: _signed(_manifest(sequence=HIGH_WATER - 1)),
        {},
        RollbackRefused,
    ),
    "rollback: an old signed manifest replayed after a newer one": (
        _signed,
        {"high_water": HIGH_WATER + 5},
        RollbackRefused,
    ),
    "equal sequence: verifies, but does not advance": (
        lambda: _signed(_manifest(sequence=HIGH_WATER)),
        {},
        None,
    ),
    "revert: old code published as a new, higher sequence is accepted": (
        lambda: _signed(_manifest(version="1.5", sequence=HIGH_WATER + 1)),
        {"installed_version": "2.0"},
        None,
    ),
    "expired: now equals expires": (_signed, {"now": NOW + 3600}, ExpiredManifest),
    "expired: one second before expiry is fine": (_signed, {"now": NOW + 3599}, None),
    "no expiry: verifies at any time": (
        lambda: _signed(_manifest(expires=None)),
        {"now": 4e9},
        None,
    ),
    "wrong app": (_signed, {"app": "other"}, WrongApp),
    "min_version: installed below it": (_signed, {"installed_version": "1.4.9"}, MinVersionNotMet),
    "min_version: installed equal to it": (_signed, {"installed_version": "1.5"}, None),
    "min_version: a fresh device has nothing installed": (
        _signed,
        {"installed_version": None},
        None,
    ),
    "order: a bad signature is reported before the wrong app": (
        _tampered,
        {"app": "other"},
        BadSignature,
    ),
    "order: wrong app before expiry": (_signed, {"app": "other", "now": 5e9}, WrongApp),
    "order: expiry before rollback": (_signed, {"now": 5e9, "high_water": 99}, ExpiredManifest),
    "order: rollback before min_version": (
        _signed,
        {"high_water": 99, "installed_version": "0.1"},
        RollbackRefused,
    ),
    "malformed: signed bytes are not a manifest": (
        lambda: _signed(codec.packb([1, 2])),
        {},
        ManifestError,
    ),
    "malformed: version not in canonical form": (
        lambda: _signed(_raw_bytes(_manifest(version="v2.0"))),
        {},
        ManifestError,
    ),
    "malformed: unknown manifest format": (
        lambda: _signed(_raw_bytes(_manifest(format=2))),
        {},
        ManifestError,
    ),
    "bad path: absolute": (lambda: _signed(_paths("/etc/passwd")), {}, BadPath),
    "bad path: parent directory": (lambda: _signed(_paths("bin/../../etc/passwd")), {}, BadPath),
    "bad path: NUL byte": (lambda: _signed(_paths("bin/thermo\x00.txt")), {}, BadPath),
    "bad path: backslash": (lambda: _signed(_paths("bin\\thermo")), {}, BadPath),
    "bad path: empty": (lambda: _signed(_paths("")), {}, BadPath),
    "bad path: duplicate": (lambda: _signed(_paths("bin/thermo", "bin/thermo")), {}, BadPath),
    "bad path: not normalised (double slash)": (
        lambda: _signed(_paths("bin//thermo")),
        {},
        BadPath,
    ),
    "bad path: not normalised (dot segment)": (
        lambda: _signed(_paths("./bin/thermo")),
        {},
        BadPath,
    ),
    "bad path: not normalised (trailing slash)": (lambda: _signed(_paths("bin/")), {}, BadPath),
    "bad path: control character": (lambda: _signed(_paths("bin/\nthermo")), {}, BadPath),
    "bad path: drive letter": (lambda: _signed(_paths("C:/thermo")), {}, BadPath),
    "bad path: too long": (lambda: _signed(_paths("a" * 1025)), {}, BadPath),
    "bad path: a file is also a directory of another": (
        lambda: _signed(_paths("bin/thermo", "bin/thermo/plugin")),
        {},
        BadPath,
    ),
}


@pytest.mark.parametrize("case", SCENARIOS)
def test_trust_scenario(case: str) -> None:
    make, overrides, expected = SCENARIOS[case]
    context: dict[str, Any] = {
        "app": "thermo",
        "high_water": HIGH_WATER,
        "now": NOW,
        "installed_version": "1.9",
    }
    context.update(overrides)
    signed = make()
    if expected is None:
        verified = verify_manifest(ROOT, signed, **context)
        assert verified.manifest == Manifest.from_bytes(signed.signed)
        assert verified.advances is (verified.manifest.sequence > context["high_water"])
        assert len(verified.signers) >= ROOT.threshold
        assert verified.signers <= set(ROOT.keys)
        return
    with pytest.raises(expected) as info:
        verify_manifest(ROOT, signed, **context)
    assert type(info.value) is expected
    assert isinstance(info.value, TrustError | ManifestError)


def test_equal_sequence_does_not_advance() -> None:
    verified = verify_manifest(
        ROOT,
        _signed(_manifest(sequence=HIGH_WATER)),
        app="thermo",
        high_water=HIGH_WATER,
        now=NOW,
        installed_version="1.9",
    )
    assert verified.advances is False


def test_unknown_manifest_fields_are_kept_and_signed() -> None:
    newer = _manifest(extra={"x-rollout": {"percent": 10}, "zz": [1, 2]})
    signed = _signed(newer)
    verified = verify_manifest(
        ROOT, signed, app="thermo", high_water=HIGH_WATER, now=NOW, installed_version="1.9"
    )
    assert verified.manifest.extra == {"x-rollout": {"percent": 10}, "zz": [1, 2]}
    assert verified.manifest.to_bytes() == signed.signed
    # The unknown field is covered by the signature like any other byte.
    before, after = codec.packb({"percent": 10}), codec.packb({"percent": 90})
    assert signed.signed.count(before) == 1
    changed = signed.signed.replace(before, after)
    with pytest.raises(BadSignature):
        verify_manifest(
            ROOT,
            m.SignedManifest(signed=changed, signatures=signed.signatures),
            app="thermo",
            high_water=HIGH_WATER,
            now=NOW,
            installed_version="1.9",
        )


def test_known_fields_win_over_extra_on_encode() -> None:
    clash = _manifest(extra={"app": "evil"})
    assert Manifest.from_bytes(clash.to_bytes()).app == "thermo"


def test_verification_is_over_the_exact_bytes_not_a_re_encoding() -> None:
    # Same content, keys in a non-canonical order: still a valid manifest, and
    # its signatures verify because they are over these very bytes (§8.3).
    wire = codec.to_wire(_manifest())
    reordered = b"\x8c" + b"".join(
        codec.packb(k) + codec.packb(v) for k, v in reversed(list(wire.items()))
    )
    assert reordered != _manifest().to_bytes()
    assert Manifest.from_bytes(reordered) == _manifest()
    signed = _signed(reordered)
    assert verify_manifest(
        ROOT, signed, app="thermo", high_water=0, now=NOW, installed_version=None
    ).advances
    other_order = _signed(_manifest())
    mixed = m.SignedManifest(signed=reordered, signatures=other_order.signatures)
    with pytest.raises(BadSignature):
        verify_manifest(ROOT, mixed, app="thermo", high_water=0, now=NOW, installed_version=None)


def test_domain_separates_manifest_and_auth_signatures() -> None:
    from fleetpush.protocol import auth

    assert DOMAIN != auth.DOMAIN
    payload = _manifest().to_bytes()
    auth_sig = auth.sign_challenge(A, payload)
    forged = m.SignedManifest(
        signed=payload, signatures=[m.Signature(keyid=keys.keyid(A), sig=auth_sig)]
    )
    with pytest.raises(BadSignature):
        verify_manifest(
            TrustRoot.from_public_keys([keys.public_bytes(A)]),
            forged,
            app="thermo",
            high_water=0,
            now=NOW,
            installed_version=None,
        )


@pytest.mark.parametrize("threshold", [0, 4])
def test_trust_root_threshold_bounds(threshold: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        TrustRoot.from_public_keys([keys.public_bytes(k) for k in (A, B, C)], threshold)
