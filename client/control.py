"""The owner's control socket: the server side of the local control API (issue 11).

The device's owner (the agent, or an embedded ``Updater.run``) serves a Unix
socket in its state dir; ``fleetpush status``, ``update`` and ``app`` and the
app's own helper (local.py) talk to it instead of opening a second releaser
session with the device's identity or changing files under the running app.

The wire is local.py's: one JSON object per line each way, one request per
connection. This module knows nothing of the updater: it is given a mapping
of operation names to async handlers (device_ops.py builds it) and an
``error_code`` callable that turns an exception into an exit code.

Robustness (STYLE.md §4):

* the socket is bound, chmod 0600, and only then listens, so no other user
  can ever connect; a peer of another uid (root aside) is refused too
  (``SO_PEERCRED``);
* a request line is at most ``MAX_REQUEST`` bytes and must arrive within
  ``REQUEST_DEADLINE``; at most ``MAX_CLIENTS`` connections are served at
  once (more are answered "busy");
* each connection's failure is caught and answered, never raised into the
  owner's nursery; a client gone before its answer is ignored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import trio

from .local import CODE_FAILURE, CODE_USAGE, MAX_REQUEST, ControlError, decode, encode

log = logging.getLogger("fleetpush.client.control")

#: A handler: the request's arguments in, a JSON-able result out.
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

#: Time a client has to send its request line.
REQUEST_DEADLINE: Final = 5.0
#: Time an answer may take to be written.
ANSWER_DEADLINE: Final = 5.0
#: Connections served at once.
MAX_CLIENTS: Final = 16


def _peer_uid(sock: trio.socket.SocketType) -> int | None:
    """The connecting process's uid (Linux ``SO_PEERCRED``), or None if unknown."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


async def _read_request(stream: trio.SocketStream) -> bytes:
    """The request line. Raises ControlError (too long, or EOF before a newline)."""
    buf = b""
    while b"\n" not in buf:
        data = await stream.receive_some(MAX_REQUEST + 1)
        if not data:
            raise ControlError("the request ended before its newline", CODE_USAGE)
        buf += data
        if len(buf) > MAX_REQUEST:
            raise ControlError(f"request larger than {MAX_REQUEST} bytes", CODE_USAGE)
    return buf.split(b"\n", 1)[0]


class ControlServer:
    """Serves ``handlers`` on a Unix socket (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        error_code: Callable[[BaseException], int],
    ) -> None:
        self.path = path
        self.handlers = handlers
        self.error_code = error_code
        self._slots = trio.CapacityLimiter(MAX_CLIENTS)

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = decode(line, "the request", CODE_USAGE)
            op = req.pop("op", None)
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                raise ControlError(f"unknown request {op!r} (known: {known})", CODE_USAGE)
            return {"result": await handler(req)}
        except Exception as e:  # every failure is an answer, never a crash of the owner
            code = e.code if isinstance(e, ControlError) else self.error_code(e)
            if code == CODE_FAILURE and not isinstance(e, ControlError):
                log.info("control request failed: %r", e)
            return {"error": str(e) or type(e).__name__, "code": code}

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        async with stream:
            uid = _peer_uid(stream.socket)
            if uid is not None and uid not in (os.getuid(), 0):
                return  # 0600 already keeps others out; this is a second lock
            try:
                with trio.fail_after(REQUEST_DEADLINE):
                    line = await _read_request(stream)
            except (ControlError, trio.TooSlowError) as e:
                doc: dict[str, Any] = {"error": str(e) or "no request in time", "code": CODE_USAGE}
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            else:
                doc = await self._answer(line)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                with trio.move_on_after(ANSWER_DEADLINE):
                    await stream.send_all(encode(doc))

    async def _guarded(self, stream: trio.SocketStream) -> None:
        if self._slots.available_tokens == 0:
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    with trio.move_on_after(ANSWER_DEADLINE):
                        await stream.send_all(encode({"error": "owner busy", "code": 1}))
            return
        async with self._slots:
            try:
                await self._serve_one(stream)
            except Exception:  # one bad client never cancels the listener
                log.exception("control connection failed")

    async def _listen(self) -> trio.socket.SocketType:
        """Bind, chmod 0600, listen. Raises OSError."""
        # We own the state dir (owner.py): a socket file left by a killed owner is stale.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(os.fspath(self.path))
            # Before listen(): until then a connect is refused, so the file's
            # umask-given mode is never usable by anyone else.
            os.chmod(self.path, 0o600)
            sock.listen(MAX_CLIENTS)
        except BaseException:
            sock.close()
            raise
        return sock

    async def serve(
        self, *, task_status: trio.TaskStatus[Path | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; started reports the socket path, or None if it
        could not be bound (logged: the owner and its app run on without it)."""
        try:
            sock = await self._listen()
        except OSError as e:
            log.error("control socket %s: %s", self.path, e.strerror or e)
            task_status.started(None)
            return
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.path)
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as e:  # EMFILE and friends: wait, do not spin
                        log.warning("control socket accept: %s", e)
                        await trio.sleep(0.5)
                        continue
                    nursery.start_soon(self._guarded, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            with contextlib.suppress(OSError):
                self.path.unlink()


__all__ = ["ControlServer", "Handler"]
