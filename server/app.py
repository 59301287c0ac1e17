"""The releaser service: the listener, connection admission, and graceful shutdown.

``serve(config)`` opens the releaser's :class:`Services` (database, stores,
caches), listens, and reports a :class:`ServerHandle` through ``task_status``.
Each accepted connection runs in its own :class:`Session`, wrapped so that any
exception closes that connection only; no request is handled here. Admission
(admission.py, issue 10 item 7) keeps separate budgets for handshaking and
authenticated connections and caps handshakes per source address; a refused
connection gets ``bye`` ``TOO_MANY_CONNECTIONS`` and is closed at once. When
``accept()`` fails for lack of descriptors (EMFILE, ENFILE), trio's
``serve_listeners`` sleeps 100 ms before trying again instead of spinning
(tests/server/test_server_limits.py checks that).

Graceful stop (``await handle.shutdown()``; the CLI calls it on SIGTERM and
SIGINT): stop accepting; refuse new ``get_chunks`` with ``UNAVAILABLE``; let
chunk streams in flight finish, for at most ``grace_period``; send every peer
``bye`` ``GOING_AWAY``; close the database. Every database write is its own
transaction, so nothing is left half-written at any point.
"""

from __future__ import annotations

import functools
import logging
import ssl
import time
from typing import Final

import attrs
import trio
from fleetpush.protocol import CloseCode, Connection, Side

from fleetpush import __version__
from fleetpush.net.dial import format_address, parse_address
from fleetpush.net.tls import ServerTls, TlsError, server_context, wrap_server_stream

from . import app_remote, leases, metrics
from .admission import Admission, Slot, source_of
from .chunks import CacheShare, current_share
from .config import ServerConfig
from .errors import ConfigError
from .services import Services
from .session import Session

log = logging.getLogger("fleetpush.server")

#: Connections being turned away at once; beyond this they are closed without a bye.
MAX_REJECTING: Final = 256


class Server:
    """The listener's side of one running releaser: admission, connections, drain.

    Holds the :class:`Services` every handler shares; each accepted
    connection becomes a :class:`Session` (trio thread only).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.tls = tls_context(config)
        self.services = Services(config)
        #: every open connection, handshaking ones included
        self.connections: set[Session] = set()
        self.admission = Admission(
            max_connections=config.max_connections,
            max_handshaking=config.max_handshaking,
            max_handshaking_per_source=config.max_handshaking_per_source,
        )
        self._rejecting = 0

    @property
    def draining(self) -> bool:
        return self.services.chunk_streams.draining

    def close(self) -> None:
        self.services.close()

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Run one connection to its end; never raises (one bad peer never hurts another)."""
        if self.draining:
            await self._turn_away(stream, "server is shutting down")
            return
        slot = self.admission.admit(source_of(stream))
        if isinstance(slot, str):
            await self._turn_away(stream, slot)
            return
        try:
            await self._run_session(stream, slot)
        finally:
            slot.release()

    async def _run_session(self, stream: trio.abc.Stream, slot: Slot) -> None:
        cfg = self.config
        handshake_timeout = cfg.handshake_timeout
        if self.admission.under_pressure:
            # Strangers holding handshake slots must turn over quickly.
            handshake_timeout = min(handshake_timeout, cfg.busy_handshake_timeout)
        if self.tls is not None:
            # The TLS handshake counts against the protocol handshake deadline.
            try:
                stream = await wrap_server_stream(stream, self.tls, timeout=handshake_timeout)
            except TlsError as e:
                log.info("TLS handshake refused: %s", e)
                return
        session = Session(
            self.services,
            stream,
            handshake_timeout=handshake_timeout,
            on_authenticated=slot.authenticate,
            source=slot.source,
        )
        self.connections.add(session)
        # This session's part of the chunk cache, seen by every task it starts
        # (chunks.current_share): a stalled reader is closed without waiting.
        share = CacheShare(lambda code, reason: session.start_task(session.close, code, reason))
        token = current_share.set(share)
        try:
            await session.run()
        except Exception:
            session.log.exception("connection failed")
        finally:
            current_share.reset(token)
            self.connections.discard(session)
            try:
                session.cleanup()
            except Exception:
                session.log.exception("cleanup failed")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _turn_away(self, stream: trio.abc.Stream, reason: str) -> None:
        code = CloseCode.GOING_AWAY if self.draining else CloseCode.TOO_MANY_CONNECTIONS
        log.warning("refusing a connection: %s", reason)
        self.services.metrics.handshake_failures.labels(code.name).inc()
        if self._rejecting >= MAX_REJECTING:
            await trio.aclose_forcefully(stream)
            return
        self._rejecting += 1
        try:
            data = Connection(Side.SERVER, now=trio.current_time()).close(code, reason)
            with trio.move_on_after(1.0):
                await stream.send_all(data)
                # Half-close and read what the peer already sent: closing with
                # unread data would reset the connection and could destroy the
                # bye before the peer reads it.
                if isinstance(stream, trio.SocketStream):
                    await stream.send_eof()
                    while await stream.receive_some(65536):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._rejecting -= 1
            await trio.aclose_forcefully(stream)

    async def drain(self) -> None:
        """Wait for chunk streams in flight (up to the grace period), then say bye to all."""
        await self.services.chunk_streams.drain(self.config.grace_period)
        async with trio.open_nursery() as nursery:
            for session in list(self.connections):
                nursery.start_soon(session.close, CloseCode.GOING_AWAY, "server shutting down")


@attrs.define(eq=False)
class ServerHandle:
    """What ``serve`` reports once listening."""

    host: str
    port: int
    server: Server
    #: where Prometheus metrics are served (``metrics`` setting), if they are.
    metrics_url: str | None = None
    #: where the web dashboard is served (``http`` setting, server/web/), if it is.
    http_url: str | None = None
    _stop: trio.Event = attrs.field(factory=trio.Event)
    _done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def services(self) -> Services:
        """The running releaser's stores, event hub and live device links."""
        return self.server.services

    def stop(self) -> None:
        """Ask for a graceful stop (returns at once)."""
        self._stop.set()

    async def shutdown(self) -> None:
        """Stop gracefully and wait until serve() has returned."""
        self._stop.set()
        await self._done.wait()


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The releaser's TLS context, or None for plain TCP. Raises :class:`ConfigError`."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ConfigError("tls_client_ca needs tls_cert and tls_key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("TLS needs both tls_cert and tls_key")
    try:
        return server_context(
            ServerTls(
                cert_file=config.tls_cert,
                key_file=config.tls_key,
                client_ca=config.tls_client_ca,
            )
        )
    except TlsError as e:
        raise ConfigError(str(e)) from e


async def open_listeners(config: ServerConfig) -> list[trio.SocketListener]:
    """Build the listening sockets (TLS, if configured, wraps each accepted stream).

    Raises :class:`ConfigError` if the address cannot be bound.
    """
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as e:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {e}") from e
    return listeners


async def _serve_dashboard(
    server: Server, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """The web dashboard (issue 16), given the operator methods' own route table."""
    from .session import ROUTES
    from .web import serve_dashboard

    config = server.config
    assert config.http is not None
    tls = None
    if server.tls is not None and config.tls_cert is not None and config.tls_key is not None:
        tls = (config.tls_cert, config.tls_key)
    await serve_dashboard(server.services, ROUTES, config.http, tls, task_status=task_status)


def _lease_context(services: Services, handle: ServerHandle) -> leases.LeaseContext:
    """What the device-lease loop needs (leases.py): a device another releaser
    took is closed here with POLICY (1014, specs/PROTOCOL.md §5.5)."""
    return leases.LeaseContext(
        store=services.leases,
        address=leases.advertised_address(handle.host, handle.port),
        live=services.fleet.device_ids,
        close=functools.partial(services.fleet.close_link, CloseCode.POLICY),
        clock=time.time,
        run=services.calls.run,
    )


async def serve(
    config: ServerConfig, *, task_status: trio.TaskStatus[ServerHandle] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a releaser until its handle's ``shutdown()`` (or cancellation).

    Raises :class:`ConfigError` (cannot listen) or ``DatabaseError`` before
    ``task_status.started``; after that, connection errors never escape.
    """
    server = Server(config)
    handle: ServerHandle | None = None
    scrape: metrics.MetricsServer | None = None
    try:
        listeners = await open_listeners(config)
        sockname = listeners[0].socket.getsockname()
        handle = ServerHandle(host=str(sockname[0]), port=int(sockname[1]), server=server)
        if server.services.cluster is not None:  # named in its connected events
            server.services.cluster.set_address(handle.host, handle.port)
        if config.metrics is not None:
            host, port = parse_address(config.metrics, listen=True)
            scrape = metrics.start_server(server.services.metrics, host, port, server.tls)
            scheme = "https" if server.tls is not None else "http"
            handle.metrics_url = f"{scheme}://{format_address(*scrape.address)}/metrics"
        async with trio.open_nursery() as nursery:
            accept_scope = trio.CancelScope()

            async def accept() -> None:
                with accept_scope:
                    await trio.serve_listeners(
                        server.handle_connection, listeners, handler_nursery=nursery
                    )

            nursery.start_soon(accept)
            nursery.start_soon(server.services.flush_loop)
            if server.services.cluster is not None:  # several releasers (cluster_bus.py)
                # What the others forward here runs the local handlers' paths.
                server.services.cluster.calls.runner = app_remote.forwarded_runner(
                    server.services
                )
                await nursery.start(server.services.cluster.run)
            await nursery.start(server.services.rollouts.run)
            nursery.start_soon(server.services.housekeeping_loop)
            nursery.start_soon(leases.lease_loop, _lease_context(server.services, handle))
            nursery.start_soon(server.services.trim_loop)
            if config.scrub_rate > 0:
                nursery.start_soon(server.services.scrub_loop)
            if config.http is not None:
                handle.http_url = await nursery.start(_serve_dashboard, server)
            if scrape is not None:
                nursery.start_soon(
                    metrics.refresh_loop,
                    server.services.metrics,
                    server.services.fleet_figures,
                    config.metrics_interval,
                )
            log.info(
                "fleetpush %s releaser %s listening on %s:%d",
                __version__,
                server.services.server_id,
                handle.host,
                handle.port,
            )
            task_status.started(handle)
            await handle._stop.wait()
            log.info("stopping: no new connections")
            accept_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            await server.drain()
            nursery.cancel_scope.cancel()
    finally:
        if scrape is not None:
            scrape.close()
        server.close()
        if handle is not None:
            handle._done.set()
