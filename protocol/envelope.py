"""The message envelope (specs/PROTOCOL.md §3): pure encoding and shape checks.

A message frame's body is a msgpack array whose first item says its kind:
``[0, id, method, params]`` (request), ``[1, id, result]`` (response),
``[2, id, code, message, data]`` (error), ``[3, method, params]``
(notification). This module turns those arrays into bytes and back and checks
their shape; it holds no connection state, so :class:`~.connection.Connection`
keeps only the bookkeeping (who asked what, the state machine, the timers).
"""

from __future__ import annotations

from typing import Any

import attrs

from . import codec
from .errors import DecodeError, FrameError, LocalProtocolError
from .frames import encode_message_frame
from .messages import AuthResult, Kind

#: Request ids are u32 (§3.1); they wrap round to 1.
MAX_ID = 2**32 - 1

#: A request is the array ``[0, id, method, params]``: fixarray of 4, then kind 0.
REQUEST_PREFIX = b"\x94" + codec.packb(Kind.REQUEST.value)


def label(method: str, kind: str, envelope: Kind = Kind.REQUEST) -> str:
    """Map a message to its state-machine label (see state.py).

    Only a *request* hello/auth and a *notification* bye are handshake
    messages; a notification named "hello" or a request named "bye" is an
    ordinary (unknown) message and must not move the state (§6).
    """
    if method in ("hello", "auth") and envelope is not Kind.NOTIFICATION:
        return method if kind == "req" else f"{method}_{kind}"
    if method == "bye" and envelope is Kind.NOTIFICATION:
        return method
    return "message"


@attrs.frozen
class EncodedParams:
    """Request params encoded once, to be sent in many requests (:func:`encode_params`).

    A push sends the same ``__force_update__`` params to every target: only the
    request id differs, so the params are msgpack-encoded once per push, not
    once per device.
    """

    type: type
    body: bytes  # the canonical msgpack encoding of ``codec.to_wire(params)``


def encode_params(params: object) -> EncodedParams:
    """Encode ``params`` (an attrs message) for :meth:`Connection.send_request_encoded`."""
    return EncodedParams(type(params), codec.packb(codec.to_wire(params)))


def encode_request_frame(rid: int, method: str, params: EncodedParams) -> bytes:
    """The message frame of request ``rid`` with pre-encoded ``params``.

    The same bytes as encoding the whole envelope at once. Raises
    :class:`LocalProtocolError` if the frame would be too large.
    """
    body = b"".join((REQUEST_PREFIX, codec.packb(rid), codec.packb(method), params.body))
    return _frame(body)


def encode_envelope(envelope: list[Any]) -> bytes:
    """The message frame of ``envelope``. Raises :class:`LocalProtocolError` if too large."""
    return _frame(codec.packb(envelope))


def _frame(body: bytes) -> bytes:
    try:
        return encode_message_frame(body)
    except FrameError as e:
        raise LocalProtocolError(str(e)) from e


def decode_envelope(body: bytes, max_body: int, max_containers: int) -> tuple[Kind, list[Any]]:
    """Unpack a message frame's body into its kind and the array.

    Raises :class:`DecodeError` if it is not an array starting with a known kind.
    """
    raw = codec.unpackb(body, max_body, max_containers)
    if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
        raise DecodeError("a message must be an array starting with its kind")
    try:
        kind = Kind(raw[0])
    except ValueError:
        raise DecodeError(f"unknown message kind {raw[0]}") from None
    return kind, raw


def expect_shape(raw: list[Any], n: int, what: str) -> None:
    """Raises :class:`DecodeError` unless ``raw`` has ``n`` items."""
    if len(raw) != n:
        raise DecodeError(f"a {what} has {n} items, got {len(raw)}")


def check_id(rid: object) -> None:
    """Raises :class:`DecodeError` unless ``rid`` is a u32."""
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= MAX_ID:
        raise DecodeError(f"message id must be a u32, got {rid!r}")


def check_type(cls: type, value: object, what: str) -> None:
    """Raises :class:`LocalProtocolError` unless ``value`` is a ``cls`` (our own misuse)."""
    if not isinstance(value, cls):
        raise LocalProtocolError(f"{what} must be {cls.__name__}, got {type(value).__name__}")


def is_pending(result: object) -> bool:
    """An auth answer that leaves the device waiting for an operator (§5.3)."""
    return isinstance(result, AuthResult) and result.status != "accepted"
