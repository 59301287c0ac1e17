"""The handshake rules, sans-IO: facts in, an accepted value or a Refusal out (§5).

The releaser's session feeds these functions what it knows (the ``hello`` and
``auth`` params, its own identity, the configured operator keys, what its
registry holds for the device) and sends what they return; nothing here reads
a socket, a clock, a file or a random source. The same module holds the one
rule saying which side or role may send which method (§7.9), used by
:class:`~fleetpush.protocol.connection.Connection` for every message it
receives, so the releaser does not restate it.

A :class:`Refusal` is answered by an error with ``code`` and ``reason``, then
``bye`` with ``close`` (§5.1, §5.2, §5.4); the state machine's REFUSED state
(§6.1) admits exactly that ``bye``.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Final

import attrs

from .auth import auth_payload, verify_challenge
from .errors import CloseCode, ErrorCode, FleetpushError
from .frames import PROTOCOL_MAJOR, PROTOCOL_VERSION
from .hashing import available_algorithms
from .keys import PUBLIC_KEY_SIZE
from .messages import Auth, Hello

#: A device id: 1-128 characters of A-Z a-z 0-9 . _ : @ -, starting alphanumeric (§5.1).
DEVICE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
#: ``protocol_version`` is exactly "major.minor" in decimal (§5.4): "1" and "1.0.0" are not.
_PROTOCOL_VERSION: Final = re.compile(r"([0-9]{1,9})\.([0-9]{1,9})")
#: How much of a peer-supplied value a refusal reason quotes.
_QUOTE: Final = 40


@attrs.frozen(kw_only=True)
class Refusal:
    """Why a handshake step is refused: the error to answer, then the bye to send."""

    code: ErrorCode  # the RPC error answering hello or auth (§9.1)
    reason: str  # a short sentence for a person; also the bye's reason
    close: CloseCode  # the bye's close code (§9.2)


@attrs.frozen(kw_only=True)
class AcceptedHello:
    """A ``hello`` the releaser answers with a nonce."""

    hello: Hello
    #: (major, minor) the client speaks; the major equals ours.
    version: tuple[int, int]
    #: optional features the client announced (§5.1), e.g. "blake3" (§7.2).
    capabilities: frozenset[str]


@attrs.frozen(kw_only=True)
class Authenticated:
    """The client proved it holds the key; for a device its enrollment decides next (§5.3)."""

    role: str
    peer_id: str
    public_key: bytes


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


def parse_protocol_version(text: str) -> tuple[int, int] | None:
    """``"1.0"`` -> ``(1, 0)``; None for anything that is not "major.minor" (§5.4)."""
    match = _PROTOCOL_VERSION.fullmatch(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def check_hello(hello: Hello) -> AcceptedHello | Refusal:
    """The releaser's checks of a decoded ``hello`` (§5.1, §5.4), in this order.

    Field types and the ``role`` value were already checked by the decoder
    (a malformed hello is a protocol error, bye 1002). Raises nothing.
    """
    version = parse_protocol_version(hello.protocol_version)
    if version is None:
        return Refusal(
            code=ErrorCode.INVALID_PARAMS,
            reason=f'protocol_version must be "major.minor" like "{PROTOCOL_VERSION}", '
            f"got {_quote(hello.protocol_version)}",
            close=CloseCode.POLICY,
        )
    if version[0] != PROTOCOL_MAJOR:
        return Refusal(
            code=ErrorCode.VERSION_MISMATCH,
            reason=f"protocol version {hello.protocol_version} is not supported: "
            f"this releaser speaks {PROTOCOL_VERSION}",
            close=CloseCode.VERSION_MISMATCH,
        )
    if len(hello.public_key) != PUBLIC_KEY_SIZE:
        return Refusal(
            code=ErrorCode.INVALID_PARAMS,
            reason=f"public_key must be {PUBLIC_KEY_SIZE} bytes, got {len(hello.public_key)}",
            close=CloseCode.POLICY,
        )
    if hello.role == "device" and not DEVICE_ID.fullmatch(hello.peer_id):
        return Refusal(
            code=ErrorCode.INVALID_PARAMS,
            reason="device id must be 1-128 of A-Z a-z 0-9 . _ : @ - (starting alphanumeric), "
            f"got {_quote(hello.peer_id)}",
            close=CloseCode.POLICY,
        )
    return AcceptedHello(hello=hello, version=version, capabilities=frozenset(hello.capabilities))


def check_auth(
    hello: Hello,
    auth: Auth,
    *,
    server_id: str,
    cid: str,
    nonce: bytes,
    operator_keys: Collection[bytes],
    registered_key: bytes | None = None,
    enrollment: str | None = None,
) -> Authenticated | Refusal:
    """The releaser's checks of ``auth`` (§5.2, §5.3), in this order.

    ``registered_key`` and ``enrollment`` are what the releaser's registry
    holds for a device id it knows (None for a new device); operators are
    checked against ``operator_keys``. Raises nothing.
    """
    payload = auth_payload(
        server_id=server_id,
        cid=cid,
        nonce=nonce,
        role=hello.role,
        peer_id=hello.peer_id,
        public_key=hello.public_key,
    )
    try:
        verify_challenge(hello.public_key, auth.signature, payload)
    except FleetpushError:
        return Refusal(
            code=ErrorCode.AUTH_FAILED,
            reason="bad signature over the nonce",
            close=CloseCode.AUTH_FAILED,
        )
    if hello.role == "operator":
        if hello.public_key not in operator_keys:
            return Refusal(
                code=ErrorCode.AUTH_FAILED,
                reason="unknown operator key",
                close=CloseCode.AUTH_FAILED,
            )
    else:
        if registered_key is not None and registered_key != hello.public_key:
            return Refusal(
                code=ErrorCode.AUTH_FAILED,
                reason=f"device {hello.peer_id} is registered with another public key",
                close=CloseCode.AUTH_FAILED,
            )
        if enrollment == "rejected":
            return Refusal(
                code=ErrorCode.REJECTED,
                reason=f"device {hello.peer_id} was rejected by an operator",
                close=CloseCode.AUTH_FAILED,
            )
    return Authenticated(role=hello.role, peer_id=hello.peer_id, public_key=hello.public_key)


def may_send(sender: str, who: str) -> bool:
    """Whether ``who`` may send a method whose catalogue sender is ``sender`` (§7.9).

    ``sender`` is the catalogue's column: "peer", "server", "client",
    "device" or "operator". ``who`` is "server", "device", "operator", or
    "client" for a client whose role is not known (a client's own Connection
    checks only its side: the releaser is the authority on roles).
    """
    if sender == "peer":
        return True
    if who == "server" or sender == "server":
        return who == sender
    return sender == "client" or who in ("client", sender)


#: §7.3.3 (protocol 1.1): the device fetches content-defined (variable-size) chunks.
VARIABLE_CHUNKS: Final = "chunks-v"
#: §2.3.1 (protocol 1.1): the device expands DATA_ZSTD frames.
ZSTD: Final = "zstd"


def hash_capabilities() -> list[str]:
    """The capabilities a device announces for the hash algorithms it can verify (§7.2)."""
    return [name for name in available_algorithms() if name != "sha256"]


def can_verify(capabilities: Collection[str], hash_name: str) -> bool:
    """Whether a peer that announced ``capabilities`` can verify a ``hash_name`` manifest.

    sha256 is required of every peer; any other algorithm must be announced (§7.2).
    """
    return hash_name == "sha256" or hash_name in capabilities


def can_fetch_chunks(capabilities: Collection[str], variable: bool) -> bool:
    """Whether a peer that announced ``capabilities`` can fetch a release's chunks.

    Fixed chunks need no announcement; content-defined ones need
    :data:`VARIABLE_CHUNKS` (§7.3.3): a 1.0 device would cut them at the
    wrong offsets.
    """
    return not variable or VARIABLE_CHUNKS in capabilities
