"""Errors the releaser raises on purpose, each with the RPC code it answers with.

Every class derives from :class:`fleetpush.protocol.FleetpushError`. The
session dispatcher turns a :class:`ServerError` into an RPC error carrying
``code`` (specs/PROTOCOL.md §9.1); anything else is a bug and answers
``INTERNAL_ERROR``.
"""

from __future__ import annotations

from fleetpush.protocol import ErrorCode, FleetpushError


class ServerError(FleetpushError):
    """Root of the releaser's own errors."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR


class ConfigError(ServerError):
    """The server configuration is invalid (bad TOML, bad key, bad value)."""

    code = ErrorCode.INVALID_PARAMS


class NotFound(ServerError):
    """No such release, device or push."""

    code = ErrorCode.NOT_FOUND


class Conflict(ServerError):
    """The request contradicts the stored state (duplicate release, bad target...)."""

    code = ErrorCode.CONFLICT


class IllegalTransition(Conflict):
    """A release status change the lifecycle does not allow (draft -> pre-released -> approved)."""


class PublishError(ServerError):
    """A release could not be published (bad source tree, digest mismatch, bad signature)."""

    code = ErrorCode.INVALID_PARAMS


class ChunkUnavailable(ServerError):
    """A chunk cannot be served: not in the manifest, or its bytes on disk are corrupt."""

    code = ErrorCode.UNAVAILABLE
