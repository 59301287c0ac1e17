"""The one exception tree of fleetpush (specs/PROTOCOL.md §9).

Everything fleetpush raises on purpose derives from :class:`FleetpushError`.
Foreign exceptions (msgpack, cryptography, OSError, ...) are wrapped at module
boundaries with ``raise ... from e`` so callers need to catch only this tree.

Protocol errors follow h11/wsproto: a *local* error means we misused the API,
a *remote* error means the peer misbehaved and carries the close code to send
before dropping the connection.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Why a connection is closed (specs/PROTOCOL.md §9.2), sent in ``bye``."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    FRAME_TOO_LARGE = 1009
    VERSION_MISMATCH = 1010
    AUTH_FAILED = 1011
    TIMEOUT = 1012
    TOO_MANY_CONNECTIONS = 1013
    POLICY = 1014
    INTERNAL_ERROR = 1015


class ErrorCode(IntEnum):
    """RPC error codes carried in error messages (specs/PROTOCOL.md §9.1).

    The -326xx range follows JSON-RPC so the meaning is familiar; fleetpush's
    own codes are positive.
    """

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    VERSION_MISMATCH = 1
    AUTH_FAILED = 2
    FORBIDDEN = 3
    NOT_FOUND = 4
    PENDING = 5
    CONFLICT = 6
    BUSY = 7
    UNAVAILABLE = 8
    REJECTED = 9


class FleetpushError(Exception):
    """Root of every error fleetpush raises on purpose."""


# --- wire protocol -----------------------------------------------------------


class ProtocolError(FleetpushError):
    """The wire protocol was violated, by us or by the peer."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (an API misuse)."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; send ``bye`` with ``close_code`` and close."""

    def __init__(self, message: str, close_code: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


class FrameError(RemoteProtocolError):
    """A frame header or body is malformed (bad magic, unknown type, bad body)."""


class FrameTooLarge(FrameError):
    """A frame declared a body longer than the configured maximum."""

    def __init__(self, message: str) -> None:
        super().__init__(message, CloseCode.FRAME_TOO_LARGE)


class DecodeError(FrameError):
    """A message body is not valid msgpack, breaks a limit, or has the wrong shape."""


class VersionMismatch(RemoteProtocolError):
    """The peers speak incompatible major protocol versions."""

    def __init__(self, message: str) -> None:
        super().__init__(message, CloseCode.VERSION_MISMATCH)


class ConnectionTimeout(RemoteProtocolError):
    """The peer was silent past the idle deadline (specs/PROTOCOL.md §6)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, CloseCode.TIMEOUT)


class RpcError(FleetpushError):
    """The peer answered a request with an error message."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.data = data


# --- request outcomes (the console's, shared by releaser and operator client) ---


class RequestRefused(FleetpushError):
    """A request was refused for a reason the caller must act on (specs/PROTOCOL.md §9.1).

    The releaser raises these in its handlers and answers with ``code``; the
    operator client raises the same classes when it receives that code, so a
    caller catches one ``NotFound`` whichever side it runs on.
    """

    code: ErrorCode = ErrorCode.INTERNAL_ERROR


class NotFound(RequestRefused):
    """No such device, release, version or push."""

    code = ErrorCode.NOT_FOUND


class Conflict(RequestRefused):
    """The request contradicts the stored state (an illegal transition, a duplicate...)."""

    code = ErrorCode.CONFLICT


class Forbidden(RequestRefused):
    """The caller may not do this: key refused, method not for its role, device not accepted."""

    code = ErrorCode.FORBIDDEN


class BadRequest(RequestRefused):
    """The parameters were refused."""

    code = ErrorCode.INVALID_PARAMS


# --- releases, versions and trust ----------------------------------------------


class VersionError(FleetpushError, ValueError):
    """A version string is not a valid PEP 440 version."""


class ManifestError(FleetpushError):
    """A manifest is malformed: missing fields, wrong types, bad encoding."""


class TrustError(FleetpushError):
    """A manifest was refused by the trust rules (specs/PROTOCOL.md §8)."""


class BadSignature(TrustError):
    """A signature does not verify over the exact signed bytes."""


class UnknownKey(TrustError):
    """A manifest carries no signature from any trusted key."""


class ThresholdNotMet(TrustError):
    """Fewer distinct trusted keys signed the manifest than the threshold needs."""


class RollbackRefused(TrustError):
    """The manifest's sequence is below the trusted high-water mark."""


class ExpiredManifest(TrustError):
    """The manifest's ``expires`` time has passed."""


class WrongApp(TrustError):
    """The manifest is for another application."""


class MinVersionNotMet(TrustError):
    """The installed version is below the manifest's ``min_version``."""


class BadPath(TrustError):
    """A file path in the manifest is unsafe or not normalised."""


class IntegrityError(TrustError):
    """Content does not match the digest or size in a verified manifest."""


class RootError(TrustError):
    """A root document was refused (specs/PROTOCOL.md §8.4): malformed, or not the next one."""


class RootRollback(RootError):
    """A root whose version is not above the trusted root's (§8.4, rule 3)."""


class ExpiredRoot(RootError):
    """The newest trusted root has expired: nothing is trusted under it until a newer one (§8.4)."""


class FreshnessError(TrustError):
    """A freshness statement was refused (specs/PROTOCOL.md §8.6)."""


class StaleFreshness(FreshnessError):
    """The newest freshness statement has expired: updates may be withheld (§8.6)."""
