"""Errors the releaser raises on purpose, each with the RPC code it answers with.

Every class derives from :class:`fleetpush.protocol.FleetpushError`. The
outcomes a console user acts on (:class:`NotFound`, :class:`Conflict`,
:class:`Forbidden`, :class:`BadRequest`) are the protocol's own classes
(fleetpush.protocol.errors), shared with the operator client; the session
dispatcher turns them and a :class:`ServerError` into an RPC error carrying
``code`` (specs/PROTOCOL.md §9.1); anything else is a bug and answers
``INTERNAL_ERROR``.
"""

from __future__ import annotations

from fleetpush.protocol import ErrorCode, FleetpushError
from fleetpush.protocol.errors import BadRequest, Conflict, Forbidden, NotFound, RequestRefused


class ServerError(FleetpushError):
    """Root of the releaser's own errors (those no console outcome names)."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR


class ConfigError(ServerError, BadRequest):
    """The server configuration is invalid (bad TOML, bad key, bad value)."""

    code = ErrorCode.INVALID_PARAMS


class IllegalTransition(Conflict):
    """A release status change the lifecycle does not allow (draft -> pre-released -> approved)."""


class PublishError(ServerError):
    """A release could not be published (bad source tree, digest mismatch, bad signature)."""

    code = ErrorCode.INVALID_PARAMS


class Unavailable(ServerError):
    """The release exists but is not available to this device (status, channel, hash: §7.10)."""

    code = ErrorCode.UNAVAILABLE


class ChunkUnavailable(ServerError):
    """A chunk cannot be served: not in the manifest, or its bytes on disk are corrupt."""

    code = ErrorCode.UNAVAILABLE


class ObjectStoreError(ServerError):
    """The object store holding release artifacts failed or refused a request (artifacts.py)."""

    code = ErrorCode.UNAVAILABLE


__all__ = [
    "BadRequest",
    "ChunkUnavailable",
    "ConfigError",
    "Conflict",
    "Forbidden",
    "IllegalTransition",
    "NotFound",
    "ObjectStoreError",
    "PublishError",
    "RequestRefused",
    "ServerError",
    "Unavailable",
]
