"""The handshake rules of protocol/handshake.py (specs/PROTOCOL.md §5, §7.9), as scenario tables.

Each table is keyed by prose (python-tuf style): the key says the rule, the
value gives the facts and the expected outcome, a :class:`Refusal` or an
accepted value.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from fleetpush.protocol import CloseCode, ErrorCode, auth, keys
from fleetpush.protocol import messages as m
from fleetpush.protocol.handshake import (
    AcceptedHello,
    Authenticated,
    Refusal,
    can_verify,
    check_auth,
    check_hello,
    may_send,
    parse_protocol_version,
)
from fp_keys import DEVICE_KEY, OPERATOR_KEY, fixed_key
from protocol_helpers import DEVICE_PUB

OPERATOR_PUB = keys.public_bytes(OPERATOR_KEY)
OTHER_PUB = keys.public_bytes(fixed_key(0xEE))

HELLO = m.Hello(protocol_version="1.0", role="device", peer_id="dev-0001", public_key=DEVICE_PUB)

# --- hello (§5.1, §5.4) ----------------------------------------------------------------

#: prose -> (changes to a valid device hello, expected refusal or None for accepted)
HELLO_SCENARIOS: dict[str, tuple[dict[str, Any], Refusal | None]] = {
    "accepted: a device speaking 1.0": ({}, None),
    "accepted: another minor version of the same major": ({"protocol_version": "1.7"}, None),
    "accepted: an operator with a name a device id could not have": (
        {"role": "operator", "peer_id": "alice smith"},
        None,
    ),
    "accepted: a device id of 128 characters": ({"peer_id": "d" * 128}, None),
    "refused: another major version names both versions": (
        {"protocol_version": "2.0"},
        Refusal(
            code=ErrorCode.VERSION_MISMATCH,
            reason="protocol version 2.0 is not supported: this releaser speaks 1.1",
            close=CloseCode.VERSION_MISMATCH,
        ),
    ),
    'refused: "1" is not "major.minor"': (
        {"protocol_version": "1"},
        Refusal(
            code=ErrorCode.INVALID_PARAMS,
            reason='protocol_version must be "major.minor" like "1.1", got \'1\'',
            close=CloseCode.POLICY,
        ),
    ),
    'refused: "1.0.0" is not "major.minor"': (
        {"protocol_version": "1.0.0"},
        Refusal(
            code=ErrorCode.INVALID_PARAMS,
            reason='protocol_version must be "major.minor" like "1.1", got \'1.0.0\'',
            close=CloseCode.POLICY,
        ),
    ),
    "refused: a public key of 31 bytes": (
        {"public_key": DEVICE_PUB[:31]},
        Refusal(
            code=ErrorCode.INVALID_PARAMS,
            reason="public_key must be 32 bytes, got 31",
            close=CloseCode.POLICY,
        ),
    ),
    "refused: a device id with a space": (
        {"peer_id": "dev 1"},
        Refusal(
            code=ErrorCode.INVALID_PARAMS,
            reason="device id must be 1-128 of A-Z a-z 0-9 . _ : @ - (starting alphanumeric), "
            "got 'dev 1'",
            close=CloseCode.POLICY,
        ),
    ),
    "refused: a device id of 129 characters, quoted short": (
        {"peer_id": "d" * 129},
        Refusal(
            code=ErrorCode.INVALID_PARAMS,
            reason="device id must be 1-128 of A-Z a-z 0-9 . _ : @ - (starting alphanumeric), "
            f"got '{'d' * 40}...'",
            close=CloseCode.POLICY,
        ),
    ),
    "refused: an empty device id": (
        {"peer_id": ""},
        Refusal(
            code=ErrorCode.INVALID_PARAMS,
            reason="device id must be 1-128 of A-Z a-z 0-9 . _ : @ - (starting alphanumeric), "
            "got ''",
            close=CloseCode.POLICY,
        ),
    ),
    "refused: the version is checked before the key": (
        {"protocol_version": "3.1", "public_key": b"short"},
        Refusal(
            code=ErrorCode.VERSION_MISMATCH,
            reason="protocol version 3.1 is not supported: this releaser speaks 1.1",
            close=CloseCode.VERSION_MISMATCH,
        ),
    ),
}


@pytest.mark.parametrize("case", HELLO_SCENARIOS)
def test_check_hello(case: str) -> None:
    changes, expected = HELLO_SCENARIOS[case]
    hello = attrs.evolve(HELLO, **changes)
    outcome = check_hello(hello)
    if expected is None:
        assert isinstance(outcome, AcceptedHello)
        assert outcome.hello is hello
        assert outcome.version == parse_protocol_version(hello.protocol_version)
    else:
        assert outcome == expected
        assert len(outcome.reason) < 200  # a sentence, never a dump


def test_accepted_hello_carries_the_announced_capabilities() -> None:
    outcome = check_hello(attrs.evolve(HELLO, capabilities=["blake3", "x-future"]))
    assert isinstance(outcome, AcceptedHello)
    assert outcome.capabilities == {"blake3", "x-future"}


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("1.0", (1, 0)), ("1.12", (1, 12)), ("2.0", (2, 0)), ("1", None), ("", None), ("1.x", None)],
)
def test_parse_protocol_version(text: str, parsed: tuple[int, int] | None) -> None:
    assert parse_protocol_version(text) == parsed


# --- auth (§5.2, §5.3) ---------------------------------------------------------------

SERVER_ID, CID, NONCE = "releaser-1", "c-1", b"n" * 32


def _signed(hello: m.Hello, key: Any, *, cid: str = CID) -> m.Auth:
    payload = auth.auth_payload(
        server_id=SERVER_ID,
        cid=cid,
        nonce=NONCE,
        role=hello.role,
        peer_id=hello.peer_id,
        public_key=hello.public_key,
    )
    return m.Auth(signature=auth.sign_challenge(key, payload))


OPERATOR_HELLO = attrs.evolve(HELLO, role="operator", peer_id="ops", public_key=OPERATOR_PUB)
AUTH_FAILED = CloseCode.AUTH_FAILED

#: prose -> (hello, auth, registry facts, expected refusal or None for authenticated)
AUTH_SCENARIOS: dict[str, tuple[m.Hello, m.Auth, dict[str, Any], Refusal | None]] = {
    "accepted: a new device signing the nonce": (HELLO, _signed(HELLO, DEVICE_KEY), {}, None),
    "accepted: a known device with its registered key": (
        HELLO,
        _signed(HELLO, DEVICE_KEY),
        {"registered_key": DEVICE_PUB, "enrollment": "accepted"},
        None,
    ),
    "accepted: a pending device (the session answers it pending, §5.3)": (
        HELLO,
        _signed(HELLO, DEVICE_KEY),
        {"registered_key": DEVICE_PUB, "enrollment": "pending"},
        None,
    ),
    "accepted: a configured operator key": (
        OPERATOR_HELLO,
        _signed(OPERATOR_HELLO, OPERATOR_KEY),
        {},
        None,
    ),
    "refused: a signature by another key": (
        HELLO,
        _signed(HELLO, OPERATOR_KEY),
        {},
        Refusal(
            code=ErrorCode.AUTH_FAILED, reason="bad signature over the nonce", close=AUTH_FAILED
        ),
    ),
    "refused: a signature over another connection's cid (replay)": (
        HELLO,
        _signed(HELLO, DEVICE_KEY, cid="c-other"),
        {},
        Refusal(
            code=ErrorCode.AUTH_FAILED, reason="bad signature over the nonce", close=AUTH_FAILED
        ),
    ),
    "refused: a device key signing as an operator": (
        attrs.evolve(HELLO, role="operator"),
        _signed(HELLO, DEVICE_KEY),
        {},
        Refusal(
            code=ErrorCode.AUTH_FAILED, reason="bad signature over the nonce", close=AUTH_FAILED
        ),
    ),
    "refused: an operator key that is not configured": (
        attrs.evolve(OPERATOR_HELLO, public_key=DEVICE_PUB),
        _signed(attrs.evolve(OPERATOR_HELLO, public_key=DEVICE_PUB), DEVICE_KEY),
        {},
        Refusal(code=ErrorCode.AUTH_FAILED, reason="unknown operator key", close=AUTH_FAILED),
    ),
    "refused: a known device id announced with another key": (
        HELLO,
        _signed(HELLO, DEVICE_KEY),
        {"registered_key": OTHER_PUB, "enrollment": "accepted"},
        Refusal(
            code=ErrorCode.AUTH_FAILED,
            reason="device dev-0001 is registered with another public key",
            close=AUTH_FAILED,
        ),
    ),
    "refused: a device an operator rejected": (
        HELLO,
        _signed(HELLO, DEVICE_KEY),
        {"registered_key": DEVICE_PUB, "enrollment": "rejected"},
        Refusal(
            code=ErrorCode.REJECTED,
            reason="device dev-0001 was rejected by an operator",
            close=AUTH_FAILED,
        ),
    ),
    "refused: a bad signature is reported before the rejection": (
        HELLO,
        m.Auth(signature=b"\x00" * 64),
        {"registered_key": DEVICE_PUB, "enrollment": "rejected"},
        Refusal(
            code=ErrorCode.AUTH_FAILED, reason="bad signature over the nonce", close=AUTH_FAILED
        ),
    ),
}


@pytest.mark.parametrize("case", AUTH_SCENARIOS)
def test_check_auth(case: str) -> None:
    hello, proof, facts, expected = AUTH_SCENARIOS[case]
    outcome = check_auth(
        hello,
        proof,
        server_id=SERVER_ID,
        cid=CID,
        nonce=NONCE,
        operator_keys={OPERATOR_PUB},
        **facts,
    )
    if expected is None:
        assert outcome == Authenticated(
            role=hello.role, peer_id=hello.peer_id, public_key=hello.public_key
        )
    else:
        assert outcome == expected


# --- who may send what (§7.9) ----------------------------------------------------------

#: prose -> (catalogue sender, who sends, allowed)
SENDER_SCENARIOS: dict[str, tuple[str, str, bool]] = {
    "ping is open to everyone: a device": ("peer", "device", True),
    "ping is open to everyone: the server": ("peer", "server", True),
    "status is open to devices": ("client", "device", True),
    "status is open to operators": ("client", "operator", True),
    "status is not the server's to send": ("client", "server", False),
    "check_update is a device's": ("device", "device", True),
    "an operator may not check for updates": ("device", "operator", False),
    "a device may not push": ("operator", "device", False),
    "an operator may push": ("operator", "operator", True),
    "__force_update__ is the server's": ("server", "server", True),
    "a device may not send __force_update__": ("server", "device", False),
    "the server may not send check_update": ("device", "server", False),
    "a client whose role is unknown passes the side check": ("operator", "client", True),
    "a client whose role is unknown still may not send server methods": (
        "server",
        "client",
        False,
    ),
}


@pytest.mark.parametrize("case", SENDER_SCENARIOS)
def test_may_send(case: str) -> None:
    sender, who, allowed = SENDER_SCENARIOS[case]
    assert may_send(sender, who) is allowed


def test_every_catalogue_sender_is_known_to_the_rule() -> None:
    for spec in m.METHODS.values():
        assert spec.sender in {"peer", "client", "device", "operator", "server"}, spec


# --- hash capabilities (§7.2) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("capabilities", "hash_name", "ok"),
    [
        ([], "sha256", True),
        ([], "blake3", False),
        (["blake3"], "blake3", True),
        (["x-other"], "blake3", False),
    ],
    ids=[
        "sha256 needs no announcement",
        "blake3 unannounced is refused",
        "blake3 announced is fine",
        "another capability does not count for blake3",
    ],
)
def test_can_verify(capabilities: list[str], hash_name: str, ok: bool) -> None:
    assert can_verify(capabilities, hash_name) is ok
