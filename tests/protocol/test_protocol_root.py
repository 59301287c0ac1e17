"""Root rotation scenarios, python-tuf style: one prose key per case (specs/PROTOCOL.md §8.4).

Each scenario builds a chain of roots from fixed keys, hands a device that
trusts root v1 the documents it would fetch, and says which error (or which
final version) the walk ends with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import keys, sign_manifest, verify_manifest
from fleetpush.protocol import messages as m
from fleetpush.protocol.errors import (
    BadSignature,
    ExpiredRoot,
    RootError,
    RootRollback,
    ThresholdNotMet,
    TrustError,
    UnknownKey,
)
from fleetpush.protocol.root import (
    MAX_ROOT_WALK,
    Role,
    Root,
    add_root_signatures,
    check_current,
    envelope_from_json,
    envelope_to_json,
    legacy_root,
    load_trusted_root,
    sequence_reset,
    sign_root,
    update_root,
)
from fleetpush.protocol.trust import TrustRoot
from fp_keys import fixed_key

NOW = 1_767_225_600
#: root keys R1..R4, release keys L1..L3 (seeds nobody else uses).
R1, R2, R3, R4 = (fixed_key(s) for s in (0x61, 0x62, 0x63, 0x64))
L1, L2, L3 = (fixed_key(s) for s in (0x71, 0x72, 0x73))


def kid(k: Ed25519PrivateKey) -> str:
    return keys.keyid(k)


def make_root(
    version: int,
    root_keys: Sequence[Ed25519PrivateKey],
    release_keys: Sequence[Ed25519PrivateKey] = (L1,),
    *,
    root_threshold: int = 1,
    release_threshold: int = 1,
    expires: int = NOW + 86_400,
    resets: dict[str, int] | None = None,
) -> Root:
    all_keys = {kid(k): keys.public_bytes(k) for k in (*root_keys, *release_keys)}
    return Root(
        version=version,
        expires=expires,
        keys=all_keys,
        root=Role(keys=[kid(k) for k in root_keys], threshold=root_threshold),
        release=Role(keys=[kid(k) for k in release_keys], threshold=release_threshold),
        sequence_resets=resets or {},
    )


def signed(root: Root, *signers: Ed25519PrivateKey) -> m.SignedManifest:
    return sign_root(root.to_bytes(), signers)


V1 = make_root(1, [R1])
V2 = make_root(2, [R2])  # rotates the root key R1 -> R2
V3 = make_root(3, [R2, R3], [L2], root_threshold=2)  # 2-of-2 root keys, release key L1 -> L2


def walk(trusted: Root, docs: Sequence[m.SignedManifest]) -> Root:
    for doc in docs[:MAX_ROOT_WALK]:
        trusted = update_root(trusted, doc).root
    return trusted


#: prose -> (documents fetched after v1, the version trusted at the end, or the error).
SCENARIOS: dict[str, tuple[Callable[[], list[m.SignedManifest]], int | type[Exception]]] = {
    "rotation v1->v2->v3 is walked one version at a time": (
        lambda: [signed(V2, R1, R2), signed(V3, R2, R3)],
        3,
    ),
    "a root signed only by the new keys is refused": (
        lambda: [signed(V2, R2)],
        UnknownKey,
    ),
    "a root signed only by the old keys is refused": (
        lambda: [signed(V2, R1)],
        UnknownKey,
    ),
    "a root signed by one of two new root keys at threshold 2 is refused": (
        lambda: [signed(V2, R1, R2), signed(V3, R2)],
        ThresholdNotMet,
    ),
    "a rollback to an older root is refused": (
        lambda: [signed(V2, R1, R2), signed(V1, R2, R1)],
        RootRollback,
    ),
    "the same version again is refused as a rollback": (
        lambda: [signed(V1, R1)],
        RootRollback,
    ),
    "skipping a version is refused": (
        lambda: [signed(make_root(3, [R1]), R1)],
        RootError,
    ),
    "a bad signature by a trusted root key is refused even at threshold": (
        lambda: [
            attrs.evolve(
                signed(V2, R1, R2),
                signatures=[
                    m.Signature(keyid=kid(R1), sig=bytes(64)),
                    *signed(V2, R2).signatures,
                ],
            )
        ],
        BadSignature,
    ),
    "a root whose bytes were changed after signing is refused": (
        lambda: [attrs.evolve(signed(V2, R1, R2), signed=make_root(2, [R2], [L3]).to_bytes())],
        BadSignature,
    ),
    "an expired intermediate root is still walked": (
        lambda: [
            signed(make_root(2, [R2], expires=NOW - 10), R1, R2),
            signed(make_root(3, [R3]), R2, R3),
        ],
        3,
    ),
    "a manifest signature is not a root signature (domains)": (
        lambda: [sign_manifest(V2.to_bytes(), [R1, R2])],
        BadSignature,
    ),
    "malformed root bytes signed by the trusted keys are refused after the signatures": (
        lambda: [sign_root(b"\x81\xa1x\x01", [R1, R2])],
        RootError,
    ),
}


@pytest.mark.parametrize("case", list(SCENARIOS), ids=list(SCENARIOS))
def test_root_walk_scenarios(case: str) -> None:
    docs, expected = SCENARIOS[case]
    if isinstance(expected, int):
        assert walk(V1, docs()).version == expected
    else:
        with pytest.raises(expected):
            walk(V1, docs())


def test_threshold_change_is_honoured() -> None:
    # v3 raises the root threshold to 2: v4 signed by one v3 key (and its own) is refused,
    # by both v3 keys it is accepted.
    v3 = walk(V1, [signed(V2, R1, R2), signed(V3, R2, R3)])
    v4 = make_root(4, [R4])
    with pytest.raises(ThresholdNotMet):
        update_root(v3, signed(v4, R2, R4))
    assert update_root(v3, signed(v4, R2, R3, R4)).root.version == 4
    # The release threshold changes too: 2-of-3 release keys.
    v5 = make_root(5, [R4], [L1, L2, L3], release_threshold=2)
    trust = update_root(update_root(v3, signed(v4, R2, R3, R4)).root, signed(v5, R4)).root
    assert trust.trust("release").threshold == 2


def _manifest_bytes() -> bytes:
    from test_protocol_trust import _manifest  # the trust scenarios' manifest

    return _manifest().to_bytes()


@pytest.mark.parametrize(
    ("case", "release_keys", "expected"),
    [
        ("a release signed by the current key verifies", (L2,), None),
        ("a release signed by a key removed in v3 is refused after rotation", (L1,), UnknownKey),
    ],
)
def test_release_trust_follows_the_root(
    case: str, release_keys: tuple[Ed25519PrivateKey, ...], expected: type[Exception] | None
) -> None:
    v3 = walk(V1, [signed(V2, R1, R2), signed(V3, R2, R3)])
    manifest = sign_manifest(_manifest_bytes(), release_keys)
    facts: dict[str, Any] = dict(app="thermo", high_water=0, now=float(NOW), installed_version=None)
    if expected is None:
        assert verify_manifest(v3.trust("release"), manifest, **facts).manifest.app == "thermo"
    else:
        with pytest.raises(expected):
            verify_manifest(v3.trust("release"), manifest, **facts)
    # Before the rotation, the same L1 release was trusted.
    if expected is not None:
        assert verify_manifest(V1.trust("release"), manifest, **facts).signers


def test_expired_final_root_is_refused_but_a_fresh_one_recovers() -> None:
    check_current(V1, NOW)
    with pytest.raises(ExpiredRoot, match="publish a newer root"):
        check_current(V1, V1.expires)
    fresh = make_root(2, [R2], expires=V1.expires + 86_400)
    v2 = update_root(V1, signed(fresh, R1, R2)).root  # walking works past expiry
    check_current(v2, V1.expires)


def test_provisioned_root_must_be_self_signed_at_threshold() -> None:
    assert load_trusted_root(signed(V1, R1)).root == V1
    with pytest.raises(UnknownKey):
        load_trusted_root(signed(V1, R2))
    v3 = make_root(3, [R2, R3], root_threshold=2)
    with pytest.raises(ThresholdNotMet):
        load_trusted_root(signed(v3, R2))


def test_legacy_trusted_keys_act_as_root_v0() -> None:
    # A device with bare trusted_keys [L1] accepts v1 signed by L1 and by v1's own root key.
    v0 = legacy_root(TrustRoot.from_public_keys([keys.public_bytes(L1)])).root
    assert v0.version == 0 and v0.trust("release").keys == {kid(L1): keys.public_bytes(L1)}
    assert update_root(v0, signed(V1, L1, R1)).root == V1
    with pytest.raises(UnknownKey):
        update_root(v0, signed(V1, R1))


def test_sequence_reset_only_lowers() -> None:
    v2 = make_root(2, [R2], resets={"thermo": 7})
    assert sequence_reset(v2, "thermo", 2**62) == 7
    assert sequence_reset(v2, "thermo", 5) is None
    assert sequence_reset(v2, "other", 2**62) is None


@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("a role naming a key the root lacks", {"release": Role(keys=["ab" * 32], threshold=1)}),
        ("a threshold above the role's keys", {"root": Role(keys=[kid(R1)], threshold=2)}),
        ("a threshold of zero", {"root": Role(keys=[kid(R1)], threshold=0)}),
        ("a key id that is not its key's hash", {"keys": {"00" * 32: keys.public_bytes(R1)}}),
        ("version zero", {"version": 0}),
        ("a negative reset", {"sequence_resets": {"thermo": -1}}),
        ("another format", {"format": 2}),
    ],
)
def test_malformed_roots_are_refused(case: str, change: dict[str, Any]) -> None:
    with pytest.raises(RootError):
        attrs.evolve(V1, **change).to_bytes()


def test_unknown_fields_are_kept_and_signed() -> None:
    raw = attrs.evolve(V1, extra={"x-note": "kept"}).to_bytes()
    assert Root.from_bytes(raw).extra == {"x-note": "kept"}
    assert Root.from_bytes(raw).to_bytes() == raw


def test_root_file_round_trip_and_offline_signing() -> None:
    env = signed(V3)  # unsigned envelope, as `fleetpush root init` writes it
    env = add_root_signatures(env, [R2])
    env = add_root_signatures(env, [R3, R2])  # R2 again replaces, never duplicates
    assert sorted(s.keyid for s in env.signatures) == sorted([kid(R2), kid(R3)])
    back = envelope_from_json(envelope_to_json(env))
    assert back == env
    assert load_trusted_root(back).root == V3
    for bad in (b"{", b"[]", b'{"signed": "zz", "signatures": []}'):
        with pytest.raises(RootError):
            envelope_from_json(bad)


def test_every_root_error_is_a_trust_error() -> None:
    for cls in (RootError, RootRollback, ExpiredRoot):
        assert issubclass(cls, TrustError)
