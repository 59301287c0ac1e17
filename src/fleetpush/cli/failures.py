"""Every failure a sentence: one line on stderr and the README's exit code.

The top level of ``fleetpush`` (:func:`fleetpush.cli.main.main`) sends
whatever a command lets escape through :func:`report`, so commands need no
try/except of their own for the shape of the message (issue 11, item 4):

- trio nurseries wrap errors in (nested) exception groups; :func:`unwrap`
  finds the one meaningful error inside (``fleetpush.net.dial.single_exception``),
- :data:`EXIT_CODES` maps error classes to the codes of README.md,
  "Exit codes", in one table, first match wins,
- :func:`message` words the error for the person who ran the command: what
  the releaser said, never an RPC method name or a ``[code]`` number,
- the traceback is printed only under ``-v``.

The line is ``fleetpush: <what failed>: <why> [hint]`` (STYLE.md §9).
"""

from __future__ import annotations

import errno
import sys
import traceback
from typing import Final

from fleetpush.net.dial import AddressError, DialError, single_exception
from fleetpush.net.peer import TransportError
from fleetpush.protocol.errors import (
    BadRequest,
    Conflict,
    ErrorCode,
    FleetpushError,
    Forbidden,
    ManifestError,
    NotFound,
    RpcError,
    TrustError,
    VersionError,
)

from .exitcodes import (
    EXIT_AUTH,
    EXIT_CONFLICT,
    EXIT_FAILURE,
    EXIT_NO_UPDATE,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)


class UsageError(FleetpushError):
    """Bad arguments or config: exit code 2."""


#: 128 + SIGPIPE, what a shell reports for ``git log | head``: the reader of
#: our output went away, which is not an error worth a message.
EXIT_BROKEN_PIPE: Final = 141

#: RPC error codes (specs/PROTOCOL.md §9.1) -> exit code, for a bare RpcError.
_RPC_CODES: Final[dict[int, int]] = {
    ErrorCode.AUTH_FAILED: EXIT_AUTH,
    ErrorCode.FORBIDDEN: EXIT_AUTH,
    ErrorCode.PENDING: EXIT_AUTH,
    ErrorCode.REJECTED: EXIT_AUTH,
    ErrorCode.VERSION_MISMATCH: EXIT_AUTH,
    ErrorCode.NOT_FOUND: EXIT_NOT_FOUND,
    ErrorCode.CONFLICT: EXIT_CONFLICT,
    ErrorCode.INVALID_PARAMS: EXIT_USAGE,
    ErrorCode.INVALID_REQUEST: EXIT_USAGE,
    ErrorCode.BUSY: EXIT_UNREACHABLE,
    ErrorCode.UNAVAILABLE: EXIT_UNREACHABLE,
}

#: What the releaser's refusal means for the user, and what to do next.
_RPC_HINTS: Final[dict[int, str]] = {
    ErrorCode.PENDING: "an operator must accept this device: fleetpush devices accept DEVICE",
    ErrorCode.REJECTED: "an operator rejected this device",
    ErrorCode.AUTH_FAILED: "the releaser does not know this key",
}


def _classes() -> tuple[tuple[type[BaseException], int], ...]:
    """The table, class -> exit code; imported late so ``--help`` stays fast."""
    from fleetpush.client.config import ConfigError as DeviceConfigError
    from fleetpush.client.session import NotAccepted
    from fleetpush.client.session import Unreachable as DeviceUnreachable
    from fleetpush.client.updater import UpdateRefused
    from fleetpush.operator import Unreachable as OperatorUnreachable


    return (
        (UsageError, EXIT_USAGE),
        (DeviceConfigError, EXIT_USAGE),
        (AddressError, EXIT_USAGE),
        (BadRequest, EXIT_USAGE),  # the releaser's ConfigError too (a port in use)
        (VersionError, EXIT_USAGE),
        (ManifestError, EXIT_USAGE),
        (NotAccepted, EXIT_AUTH),  # before Unreachable: it is one
        (DeviceUnreachable, EXIT_UNREACHABLE),
        (OperatorUnreachable, EXIT_UNREACHABLE),
        (DialError, EXIT_UNREACHABLE),
        (TransportError, EXIT_UNREACHABLE),
        (Forbidden, EXIT_AUTH),
        (NotFound, EXIT_NOT_FOUND),
        (Conflict, EXIT_CONFLICT),
        (UpdateRefused, EXIT_NO_UPDATE),
    )


def unwrap(e: BaseException) -> BaseException:
    """The one error inside ``e`` when it is an exception group of a single error.

    A group holding several errors is returned as it is (it is a bug report).
    """
    while isinstance(e, BaseExceptionGroup):
        single = single_exception(e)
        if single is None:
            return e
        e = single
    return e


def exit_code_for(e: BaseException) -> int:
    """The exit code for ``e`` (README.md, "Exit codes"); 1 for anything else."""
    e = unwrap(e)
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, RpcError):
        return _RPC_CODES.get(e.code, EXIT_FAILURE)
    for cls, code in _classes():
        if isinstance(e, cls):
            return code
    return EXIT_FAILURE


def message(e: BaseException) -> str:
    """``<what failed>: <why> [hint]`` for ``e``, without the ``fleetpush:`` prefix."""
    e = unwrap(e)
    if isinstance(e, RpcError):
        text = f"the releaser refused: {e.message}"
        hint = _RPC_HINTS.get(e.code)
        return f"{text} [{hint}]" if hint else text
    if isinstance(e, TrustError):
        return f"the offered release was refused: {e}"
    if isinstance(e, FleetpushError):
        text = str(e) or type(e).__name__
        cause = e.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            text += " [another process holds the port: stop it, or pick another with --listen]"
        return text
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    if isinstance(e, BaseExceptionGroup):
        return f"{len(e.exceptions)} errors at once (run with -v for the tracebacks)"
    return f"unexpected error: {type(e).__name__}: {e} [run with -v for the traceback]"


def report(e: BaseException, *, verbose: bool, prefix: str = "fleetpush") -> int:
    """Print the one line for ``e`` (and the traceback when ``verbose``); its exit code."""
    if verbose:
        traceback.print_exception(e, file=sys.stderr)
    print(f"{prefix}: {message(e)}", file=sys.stderr, flush=True)
    return exit_code_for(e)


__all__ = ["EXIT_BROKEN_PIPE", "exit_code_for", "message", "report", "unwrap"]
