"""Events that :meth:`Connection.next_event` returns (specs/PROTOCOL.md §4)."""

from __future__ import annotations

from typing import Any, Final

from attrs import frozen


class _NeedData:
    """Sentinel: feed more bytes with ``receive_data`` before asking again."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@frozen(kw_only=True)
class RequestReceived:
    id: int
    method: str
    params: Any


@frozen(kw_only=True)
class ResponseReceived:
    id: int
    method: str
    result: Any


@frozen(kw_only=True)
class ErrorReceived:
    id: int
    method: str
    code: int
    message: str
    data: Any = None


@frozen(kw_only=True)
class NotificationReceived:
    method: str
    params: Any


@frozen(kw_only=True, eq=False)
class ChunkReceived:
    """One DATA frame: a chunk asked for by our ``get_chunks`` request ``stream``.

    ``compressed``: it came as DATA_ZSTD (§2.3.1): ``payload`` is one zstd frame,
    to expand with :func:`fleetpush.protocol.compression.decompress_chunk`.
    """

    stream: int
    file: int
    chunk: int
    payload: memoryview
    compressed: bool = False


@frozen(kw_only=True)
class ConnectionClosed:
    """The peer said ``bye`` (with its code) or closed the byte stream cleanly."""

    code: int
    reason: str


ConnectionEvent = (
    RequestReceived
    | ResponseReceived
    | ErrorReceived
    | NotificationReceived
    | ChunkReceived
    | ConnectionClosed
)
