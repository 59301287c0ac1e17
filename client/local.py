"""Talk to the device's owner over its control socket: a tiny synchronous client.

For apps (any language could do the same) and for the device commands::

    from fleetpush.client import local

    local.status()["installed"]        # what the agent knows, no releaser asked
    local.confirm()                    # the new version is healthy: commit it
    local.report_activity(users=3)     # the activity gate decides with it
    local.on_update_pending(print)     # told before an update stops the app

The socket is found in ``$FLEETPUSH_CONTROL_SOCKET`` (the agent sets it in
its app's environment), else in ``state_dir``. The wire is one JSON object
per line each way, one request per connection (README, "Control socket")::

    -> {"op": "status"}
    <- {"result": {...}}            or   {"error": "one sentence", "code": 6}

``code`` is the fleetpush exit code for that failure (README, exit codes).
This is not the releaser protocol: it never leaves the machine, and the
socket is mode 0600, so only the device's user may use it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from fleetpush.protocol.errors import FleetpushError

#: Environment variable naming the control socket (set for the agent's app).
SOCKET_ENV: Final = "FLEETPUSH_CONTROL_SOCKET"
#: Environment variable holding the version the agent started its app as.
VERSION_ENV: Final = "FLEETPUSH_VERSION"

#: The socket's name in the state directory (layout.py: ``control_socket``).
SOCKET_NAME: Final = "control.sock"

#: Largest request line and response line, in bytes (a longer one is an error).
MAX_REQUEST: Final = 64 * 1024
MAX_RESPONSE: Final = 1024 * 1024

#: Exit codes carried as ``code`` (README, exit codes; fleetpush.cli.exitcodes).
CODE_FAILURE: Final = 1
CODE_USAGE: Final = 2
CODE_UNREACHABLE: Final = 3
CODE_AUTH: Final = 4
CODE_NOT_FOUND: Final = 5
CODE_CONFLICT: Final = 6
CODE_NO_UPDATE: Final = 10


class ControlError(FleetpushError):
    """The owner answered with an error; ``code`` is its exit code."""

    def __init__(self, message: str, code: int = CODE_FAILURE) -> None:
        super().__init__(message)
        self.code = code


class NoOwner(ControlError):
    """No process answers on the control socket (no agent runs, or it is starting)."""


def encode(doc: dict[str, Any]) -> bytes:
    """One line of the wire: compact JSON and a newline."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=str).encode() + b"\n"


def decode(line: bytes, what: str, code: int = CODE_FAILURE) -> dict[str, Any]:
    """A JSON object from one line. Raises :class:`ControlError` (with ``code``)."""
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise ControlError(f"{what} is not JSON: {e}", code) from e
    if not isinstance(doc, dict):
        raise ControlError(f"{what} is not a JSON object", code)
    return doc


def socket_path(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """``$FLEETPUSH_CONTROL_SOCKET``, else ``state_dir``'s socket.

    Raises :class:`NoOwner` if neither is given.
    """
    if state_dir is not None:
        return Path(state_dir) / SOCKET_NAME
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    raise NoOwner(f"no control socket: set {SOCKET_ENV} or give the state directory")


def request(
    op: str,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    deadline: float = 10.0,
    **args: Any,
) -> dict[str, Any]:
    """Send one request (``args`` are its fields) and return its ``result``.

    ``deadline`` bounds the whole exchange, in seconds.

    Raises :class:`NoOwner` (nothing listens on the socket),
    :class:`ControlError` (the owner's error, with its code; or a broken,
    oversized or late answer: code 1).
    """
    where = Path(path) if path is not None else socket_path(state_dir)
    line = encode({"op": op, **args})
    if len(line) > MAX_REQUEST:
        raise ControlError(f"{op}: request larger than {MAX_REQUEST} bytes", CODE_USAGE)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(deadline)
        try:
            sock.connect(os.fspath(where))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NoOwner(f"nothing answers on {where}: {e.strerror or e}") from e
        except OSError as e:
            raise NoOwner(f"cannot connect to {where}: {e.strerror or e}") from e
        try:
            sock.sendall(line)
            answer = _read_line(sock, MAX_RESPONSE)
        except TimeoutError as e:
            raise ControlError(f"{op}: no answer from the owner within {deadline:g}s") from e
        except OSError as e:
            raise ControlError(f"{op}: control socket failed: {e.strerror or e}") from e
    finally:
        sock.close()
    doc = decode(answer, "the owner's answer")
    if "error" in doc:
        code = doc.get("code")
        raise ControlError(str(doc["error"]), code if isinstance(code, int) else CODE_FAILURE)
    result = doc.get("result")
    if not isinstance(result, dict):
        raise ControlError(f"{op}: the owner's answer has no result")
    return result


def _read_line(sock: socket.socket, limit: int) -> bytes:
    """Bytes up to the first newline. Raises ControlError (too long, or EOF first)."""
    buf = b""
    while b"\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ControlError("the owner closed the control socket without an answer")
        buf += data
        if len(buf) > limit:
            raise ControlError(f"the owner's answer is larger than {limit} bytes")
    return buf.split(b"\n", 1)[0]


def status(**where: Any) -> dict[str, Any]:
    """The device's status as its owner sees it (nothing is changed, no releaser asked)."""
    return request("status", **where)


def confirm(**where: Any) -> dict[str, Any]:
    """Tell the owner the version on trial is healthy (commits it)."""
    return request("confirm", **where)


def report_activity(*, users: int, **where: Any) -> dict[str, Any]:
    """Tell the owner how many users the app is serving now.

    The activity gate decides with it whether an update may stop the app
    (README, "Python services", "Activity gate"); a report older than
    ``activity_max_age`` counts as unknown, so report at least that often.
    """
    return request("report_activity", users=users, **where)


def wait_update_pending(*, after: int = -1, wait: float = 30.0, **where: Any) -> dict[str, Any]:
    """``{"seq", "pending"}`` once the pending-update notice changes after ``after``
    (at once for -1), else after ``wait`` seconds (at most 60).

    ``pending`` is None or ``{"version", "starts_at", "users", "reason"}``:
    the update the owner is about to apply, and when (epoch seconds; None
    while it waits for the users to drop, with no time known).
    """
    return request("update_pending", after=after, wait=wait, deadline=wait + 10.0, **where)


def on_update_pending(
    callback: Callable[[dict[str, Any]], object], *, retry: float = 1.0, **where: Any
) -> threading.Thread:
    """Call ``callback(pending)`` from a daemon thread for each update the owner
    announces (see :func:`wait_update_pending`); returns the thread.

    The thread runs for the life of the process; an owner that is away (an
    agent restarting) is asked again after ``retry`` seconds. Exceptions of
    ``callback`` are printed and do not stop it.
    """

    def loop() -> None:
        seq: int | None = None
        while True:
            try:
                doc = wait_update_pending(after=-1 if seq is None else seq, **where)
            except ControlError:
                time.sleep(retry)
                continue
            seq = int(doc.get("seq", 0))
            pending = doc.get("pending")
            # The first answer is what is pending already (an app that starts
            # while the owner waits is told too); a notice is sent again when
            # its start time changes (``starts_at`` now: the update begins).
            if isinstance(pending, dict):
                try:
                    callback(pending)
                except Exception:
                    traceback.print_exc()

    thread = threading.Thread(target=loop, name="fleetpush-update-pending", daemon=True)
    thread.start()
    return thread


__all__ = [
    "SOCKET_ENV",
    "VERSION_ENV",
    "ControlError",
    "NoOwner",
    "confirm",
    "on_update_pending",
    "report_activity",
    "request",
    "socket_path",
    "status",
    "wait_update_pending",
]
