"""The one way to reach the releaser: addresses, and :func:`dial`.

Every connecting side (the device session, the operator client, the bench,
the soak script, the server's tests) does the same four steps, so they live
here once (issue 9): TCP under a deadline, optional TLS (:mod:`.tls`), a
client :class:`~fleetpush.protocol.Connection` run by :func:`.peer.open_peer`,
and the hello/auth handshake of specs/PROTOCOL.md §5.

Errors come out in two kinds, so each caller can name them for its user:

- :class:`DialError` (a :class:`~.peer.TransportError`): no TCP connection in
  time, a TLS failure, or no handshake answer in time. :class:`~.peer.PeerClosed`
  (also a TransportError) when the releaser closed the link during the handshake.
- :class:`~fleetpush.protocol.RpcError`: the releaser answered the handshake
  with a refusal (§5.4, §9.1: version mismatch, auth failed, rejected, pending).

Addresses are ``HOST:PORT``, ``HOST`` (the default port) or ``[IPV6]:PORT``;
:class:`AddressError` says what is wrong with one.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetpush.protocol import Connection, FleetpushError, Side
from fleetpush.protocol.limits import DEFAULT_HEARTBEAT
from fleetpush.protocol.messages import AuthResult, Hello, HelloResult

from .peer import (
    NotificationHandler,
    Peer,
    RequestHandler,
    TransportError,
    client_handshake,
    open_peer,
)
from .tls import ClientTls, TlsError, wrap_client_stream

#: The releaser's port when an address names none (README, "Configuration").
DEFAULT_PORT: Final = 7878


class AddressError(FleetpushError, ValueError):
    """An address is not ``HOST:PORT``, ``HOST`` or ``[IPV6]:PORT``.

    Callers wrap it into their own configuration or usage error at their
    boundary; its message is one sentence naming the address.
    """


class DialError(TransportError):
    """The releaser could not be reached: TCP, TLS, or no handshake answer in time."""


# --- addresses ---------------------------------------------------------------------------


def parse_address(
    text: str, default_port: int = DEFAULT_PORT, *, listen: bool = False
) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``[IPV6]:PORT`` -> ``(host, port)``.

    The host is always required (``":80"`` is refused, for listening too: the
    releaser binds where it is told, never "everywhere" by omission). An IPv6
    host must be bracketed, since ``a:b:c`` cannot be split unambiguously.
    The port is 1-65535; with ``listen`` also 0, which picks a free port.
    Raises :class:`AddressError`.
    """
    raw = text.strip()

    def bad(why: str) -> AddressError:
        return AddressError(f"bad address {text!r}: {why}")

    if not raw:
        raise bad("it is empty (want HOST:PORT)")
    port_text: str | None = None
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise bad("no ']' after the IPv6 host")
        host, rest = raw[1:end], raw[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise bad("want [IPV6]:PORT")
            port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        if raw.count(":") > 1:
            raise bad("too many ':' (write an IPv6 host in brackets: [::1]:7878)")
        host, sep, after = raw.partition(":")
        if sep:
            port_text = after
        if not host:
            raise bad("no host (want HOST:PORT)")
        if any(c.isspace() or c in "[]/" for c in host):
            raise bad(f"{host!r} is not a host name or address")
    if port_text is None:
        return host, default_port
    lowest = 0 if listen else 1
    if not (port_text.isascii() and port_text.isdigit()):
        raise bad(f"the port {port_text!r} is not a number")
    port = int(port_text)
    if not lowest <= port <= 65535:
        raise bad(f"the port must be {lowest}-65535")
    return host, port


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, bracketing an IPv6 host; :func:`parse_address` reads it back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- dialling ----------------------------------------------------------------------------


@attrs.frozen
class Dialed:
    """What :func:`dial` yields: the authenticated peer and the releaser's answers."""

    peer: Peer
    hello: HelloResult
    auth: AuthResult


@asynccontextmanager
async def dial(
    address: str | tuple[str, int],
    key: Ed25519PrivateKey,
    hello: Hello,
    *,
    timeout: float,
    handshake_timeout: float | None = None,
    tls: ClientTls | None = None,
    heartbeat: float = DEFAULT_HEARTBEAT,
    on_request: RequestHandler | None = None,
    on_notification: NotificationHandler | None = None,
    name: str | None = None,
    local_address: str | None = None,
) -> AsyncIterator[Dialed]:
    """Connect, optionally over TLS, and run the handshake as ``hello`` says.

    ``timeout`` bounds the TCP connect and, separately, the TLS handshake;
    ``handshake_timeout`` (default: ``timeout``) bounds hello and auth (§5).
    The peer lives for the ``async with`` block (inside :func:`open_peer`'s
    nursery) and is closed when it ends. ``auth.status`` may be ``pending`` or
    ``rejected``: what that means is the caller's to decide. ``local_address``
    binds the source address (the bench spreads many links over 127.0.0.x).

    Raises :class:`AddressError` (``address`` text), :class:`DialError`,
    :class:`~.peer.PeerClosed`, or :class:`~fleetpush.protocol.RpcError` for a
    refusal; these come out as themselves, not wrapped in an exception group.
    Exceptions of the body pass through as the nursery raises them.
    """
    host, port = parse_address(address) if isinstance(address, str) else address
    where = format_address(host, port)
    stream = await _open_stream(host, port, where, timeout, tls, local_address=local_address)
    conn = Connection(Side.CLIENT, now=trio.current_time(), heartbeat=heartbeat)
    in_body = False
    try:
        async with open_peer(
            stream,
            conn,
            name=name or f"releaser {where}",
            on_request=on_request,
            on_notification=on_notification,
        ) as peer:
            limit = timeout if handshake_timeout is None else handshake_timeout
            try:
                hello_result, auth_result = await client_handshake(peer, key, hello, timeout=limit)
            except trio.TooSlowError as e:
                raise DialError(
                    f"the releaser at {where} did not complete the handshake within {limit:g}s"
                ) from e
            in_body = True
            yield Dialed(peer, hello_result, auth_result)
    except BaseExceptionGroup as group:
        # A handshake failure happened inside open_peer's nursery, which wraps
        # it; give the caller the error itself.
        single = None if in_body else single_exception(group)
        if single is None or isinstance(single, trio.Cancelled):
            raise
        raise single from single.__cause__


async def _open_stream(
    host: str,
    port: int,
    where: str,
    timeout: float,
    tls: ClientTls | None,
    *,
    local_address: str | None = None,
) -> trio.abc.Stream:
    """TCP (and TLS) to ``host:port``. Raises :class:`DialError`."""
    stream: trio.abc.Stream
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port, local_address=local_address)
    except (OSError, trio.TooSlowError) as e:
        raise DialError(f"cannot reach the releaser at {where}: {_reason(e)}") from e
    if tls is not None:
        try:
            stream = await wrap_client_stream(stream, tls, host=host, timeout=timeout)
        except TlsError as e:
            raise DialError(str(e)) from e
    return stream


def _reason(e: BaseException) -> str:
    """A short cause: "timed out", "Connection refused", "Name or service not known"."""
    if isinstance(e, trio.TooSlowError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    # trio's "all attempts to connect ... failed" keeps each attempt's error in a group
    inner = e.__cause__
    if isinstance(inner, BaseExceptionGroup):
        # trio's strerror names the socket address too; errno alone is the cause
        causes = _unique(
            os.strerror(leaf.errno) if leaf.errno else str(leaf)
            for leaf in _leaves(inner)
            if isinstance(leaf, OSError)
        )
        if causes:
            return ", ".join(causes)
    return str(e) or type(e).__name__


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for inner in e.exceptions for leaf in _leaves(inner)]
    return [e]


def single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one real error inside a (nested) exception group, ignoring cancellations.

    None when there are several; a lone ``Cancelled`` when that is all there is.
    """
    leaves = _leaves(group)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real and leaves:
        return leaves[0]
    return None


__all__ = [
    "DEFAULT_PORT",
    "AddressError",
    "DialError",
    "Dialed",
    "dial",
    "format_address",
    "parse_address",
    "single_exception",
]
