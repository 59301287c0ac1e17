"""The device's health document, and the optional local HTTP endpoint that serves it.

``fleetpush status --json`` and ``GET /health`` (``health_listen =
"127.0.0.1:PORT"`` in agent.toml, off by default) answer the same fields
(issue 11, "Health endpoint and fields"):

``status``
    ``ok``; ``degraded`` (the releaser is not connected, or the last
    operation failed: ``lastError``); ``down`` (the supervised app is not
    running). The endpoint answers 503 for ``down``, 200 otherwise.
``version``
    the installed (running) version.
``latestVersion``
    the newest version the releaser offers this device, the installed one
    if it offers nothing newer; null before the first check.
``updateAvailable``
    whether ``latestVersion`` may be installed; never true for the
    installed version.
``schemaVersion``
    :data:`SCHEMA_VERSION`, raised when a field changes meaning.
``state``
    the update state (``idle``, ``downloading``, ``staged``, ``trial``...).
``uptime``, ``pid``
    the app's, seconds (to the millisecond) and process id; null if none.
``lastError``
    the last failed operation's message, or null.
``timestamp``
    when the document was made, UTC, RFC 3339.

The endpoint is a deliberately tiny HTTP/1.1 server on trio: ``GET
/health`` only, one request per connection (``Connection: close``), the
request head bounded to :data:`MAX_REQUEST` bytes and read within
:data:`REQUEST_DEADLINE` seconds, at most :data:`MAX_CLIENTS` at once. It
reads the owner's status and changes nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

log = logging.getLogger("fleetpush.client.agent")

#: The health document's schema; raised when a field changes meaning.
SCHEMA_VERSION: Final = 1

#: Longest request head (request line and headers) read, in bytes.
MAX_REQUEST: Final = 8192

#: A client has this long to send its request head, and to take the answer.
REQUEST_DEADLINE: Final = 5.0

#: How long an answered client may still send (bounded by 8 x MAX_REQUEST bytes).
DRAIN_SECONDS: Final = 0.5

#: Connections served at once; more are closed at once.
MAX_CLIENTS: Final = 8

StatusSource = Callable[[], Awaitable[dict[str, Any]]]


def health_fields(doc: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The health fields for a device status document (the owner's or the state dir's).

    ``doc`` keys read: installed, newest, update_available, checked, trial,
    staged, phase, app_state, pid, uptime, connection, last_error. Pure.
    """
    installed = doc.get("installed")
    newest = doc.get("newest")
    checked = bool(doc.get("checked")) or newest is not None
    available = bool(doc.get("update_available")) and newest not in (None, installed)
    app_state = doc.get("app_state")
    last_error = doc.get("last_error")
    if app_state is not None and app_state != "running":
        status = "down"
    elif doc.get("connection", "connected") != "connected" or last_error:
        status = "degraded"
    else:
        status = "ok"
    if doc.get("trial"):
        state = "trial"
    elif doc.get("staged") and doc.get("phase", "idle") in ("idle", "up_to_date"):
        state = "staged"
    else:
        state = str(doc.get("phase") or "idle")
    uptime = doc.get("uptime")
    when = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.UTC)
    return {
        "status": status,
        "version": installed,
        "latestVersion": ((newest or installed) if checked else None),
        "updateAvailable": available,
        "schemaVersion": SCHEMA_VERSION,
        "state": state,
        "uptime": round(uptime, 3) if isinstance(uptime, int | float) and doc.get("pid") else None,
        "pid": doc.get("pid"),
        "lastError": last_error,
        "timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of ``health_listen``. Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"health_listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8081")
    return host.strip("[]"), int(port)


async def start_health(nursery: trio.Nursery, listen: str, source: StatusSource) -> str | None:
    """Start :func:`serve_health` in ``nursery``; None, or why it could not (logged).

    A taken port is reported (the owner's ``lastError``), never fatal: it
    must not stop the app's supervision.
    """
    try:
        await nursery.start(serve_health, listen, source)
    except OSError as e:
        why = f"health endpoint {listen}: {e.strerror or e}"
        log.error("%s", why)
        return why
    return None


async def serve_health(
    listen: str,
    source: StatusSource,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /health`` on ``listen`` until cancelled; ``started`` with the port.

    Raises ValueError (a bad address) or OSError (the port is taken) before
    it has started.
    """
    host, port = parse_listen(listen)
    limiter = trio.CapacityLimiter(MAX_CLIENTS)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            with trio.move_on_after(REQUEST_DEADLINE):
                await _answer(stream, source)
                await _drain(stream)
        except Exception as e:  # one client's trouble must never stop the agent
            log.warning("health: %s", e)
        finally:
            limiter.release()
            await trio.aclose_forcefully(stream)

    # Opened before any nursery, so a taken port is a plain OSError for the caller.
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = int(listeners[0].socket.getsockname()[1])
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        log.info("health endpoint on http://%s:%d/health", host, bound)
        task_status.started(bound)


async def _answer(stream: trio.SocketStream, source: StatusSource) -> None:
    """Read one request head and answer it. Never raises for the client's faults."""
    head = await _read_head(stream)
    if head is None:
        return await _send(stream, 400, {"error": "bad or oversized request"})
    request_line, _, rest = head.partition(b"\r\n")
    parts = request_line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return await _send(stream, 400, {"error": "bad request line"})
    # Parsed only to refuse a malformed head; no header changes the answer.
    try:
        http.client.parse_headers(io.BytesIO(rest + b"\r\n"))
    except http.client.HTTPException:
        return await _send(stream, 400, {"error": "bad headers"})
    method, target = parts[0], parts[1].split("?", 1)[0]
    if target != "/health":
        return await _send(stream, 404, {"error": "not found: only GET /health"})
    if method not in ("GET", "HEAD"):
        return await _send(stream, 405, {"error": "method not allowed"}, allow="GET, HEAD")
    try:
        doc = health_fields(await source())
    except Exception as e:  # the owner's status failed: say so, stay up
        log.warning("health: status failed: %s", e)
        return await _send(stream, 503, {"status": "down", "lastError": str(e)})
    await _send(stream, 503 if doc["status"] == "down" else 200, doc, head_only=method == "HEAD")


async def _drain(stream: trio.SocketStream) -> None:
    """Half-close, then read (bounded, briefly) what the client still sends.

    Closing a socket with unread bytes resets the connection, and the client
    may lose the answer (an oversized request's 400) before it reads it.
    """
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_eof()
        with trio.move_on_after(DRAIN_SECONDS):
            left = 8 * MAX_REQUEST
            while left > 0 and (chunk := await stream.receive_some(MAX_REQUEST)):
                left -= len(chunk)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request head without its blank line, or None if too long or cut short."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_REQUEST:
            return None
        try:
            chunk = await stream.receive_some(MAX_REQUEST)
        except trio.BrokenResourceError:
            return None
        if not chunk:
            return None
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0]
    return head if len(head) <= MAX_REQUEST else None


async def _send(
    stream: trio.SocketStream,
    code: int,
    doc: dict[str, Any],
    *,
    allow: str | None = None,
    head_only: bool = False,
) -> None:
    body = json.dumps(doc, sort_keys=True).encode() + b"\n"
    lines = [
        f"HTTP/1.1 {code} {http.client.responses.get(code, '')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        lines.append(f"Allow: {allow}")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(out)


__all__ = ["SCHEMA_VERSION", "health_fields", "parse_listen", "serve_health", "start_health"]
