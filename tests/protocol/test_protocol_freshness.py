"""Freshness statement scenarios, python-tuf style (specs/PROTOCOL.md §8.6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
from fleetpush.protocol import keys
from fleetpush.protocol import messages as m
from fleetpush.protocol.errors import (
    BadSignature,
    FreshnessError,
    StaleFreshness,
    TrustError,
    UnknownKey,
)
from fleetpush.protocol.freshness import (
    Freshness,
    check_promise,
    command_digest,
    sign_freshness,
    verify_freshness,
)
from fleetpush.protocol.manifest import sign_manifest
from fleetpush.protocol.trust import TrustRoot
from fp_keys import fixed_key

TS, THIEF = fixed_key(0xA1), fixed_key(0xA2)
TRUST = TrustRoot.from_public_keys([keys.public_bytes(TS)])
NOW = 1_767_225_600
NONCE = bytes(range(32))
CMD = m.UpdateCommand(app="demo", version="2.0", restart=True, push_id="p1")
DIGEST = command_digest("__force_update__", CMD)


def statement(**changes: Any) -> Freshness:
    base = Freshness(
        server_id="fp-1",
        counter=10,
        issued=NOW - 5,
        expires=NOW + 60,
        nonce=NONCE,
        sequences={"demo": {"stable": 4, "beta": 5}},
    )
    return attrs.evolve(base, **changes)


#: prose -> (the statement as received, verify kwargs changes, expected error or None).
SCENARIOS: dict[
    str, tuple[Callable[[], m.SignedManifest], dict[str, Any], type[Exception] | None]
] = {
    "a fresh statement for this nonce verifies": (
        lambda: sign_freshness(statement(), [TS]),
        {},
        None,
    ),
    "a statement for another nonce is a replay": (
        lambda: sign_freshness(statement(nonce=bytes(32)), [TS]),
        {},
        FreshnessError,
    ),
    "a counter below the last accepted is refused": (
        lambda: sign_freshness(statement(counter=9), [TS]),
        {},
        FreshnessError,
    ),
    "the same counter again (another nonce) is accepted": (
        lambda: sign_freshness(statement(counter=10), [TS]),
        {},
        None,
    ),
    "an expired statement is stale": (
        lambda: sign_freshness(statement(expires=NOW), [TS]),
        {},
        StaleFreshness,
    ),
    "a statement signed by a key the root does not list is refused": (
        lambda: sign_freshness(statement(), [THIEF]),
        {},
        UnknownKey,
    ),
    "a manifest signature is not a freshness signature (domains)": (
        lambda: sign_manifest(statement().to_bytes(), [TS]),
        {},
        BadSignature,
    ),
    "a command statement authorises that command": (
        lambda: sign_freshness(statement(command=DIGEST), [TS]),
        {"command": DIGEST},
        None,
    ),
    "a statement without a command does not authorise one": (
        lambda: sign_freshness(statement(), [TS]),
        {"command": DIGEST},
        FreshnessError,
    ),
    "a command statement does not authorise another version": (
        lambda: sign_freshness(statement(command=DIGEST), [TS]),
        {"command": command_digest("__force_update__", attrs.evolve(CMD, version="6.6.6"))},
        FreshnessError,
    ),
    "force and apply are different commands": (
        lambda: sign_freshness(statement(command=DIGEST), [TS]),
        {"command": command_digest("__apply_update__", CMD)},
        FreshnessError,
    ),
}


@pytest.mark.parametrize("case", list(SCENARIOS), ids=list(SCENARIOS))
def test_freshness_scenarios(case: str) -> None:
    make, kw, expected = SCENARIOS[case]
    facts: dict[str, Any] = {"nonce": NONCE, "last_counter": 10, "now": float(NOW), **kw}
    if expected is None:
        assert verify_freshness(TRUST, make(), **facts).counter >= 10
    else:
        with pytest.raises(expected):
            verify_freshness(TRUST, make(), **facts)


def test_promise_refuses_installs_older_than_promised() -> None:
    f = statement()
    check_promise(f, app="demo", channel="stable", sequence=4)
    check_promise(f, app="other", channel="stable", sequence=1)  # nothing promised
    with pytest.raises(FreshnessError, match="older than the 4"):
        check_promise(f, app="demo", channel="stable", sequence=3)


def test_round_trip_keeps_unknown_fields_and_errors_are_trust_errors() -> None:
    raw = statement(extra={"x-new": 1}).to_bytes()
    assert Freshness.from_bytes(raw).to_bytes() == raw
    with pytest.raises(FreshnessError):
        Freshness.from_bytes(b"\xc1")
    assert issubclass(FreshnessError, TrustError) and issubclass(StaleFreshness, FreshnessError)
