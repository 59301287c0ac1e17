"""Prometheus metrics of one releaser (``fleetpush server --metrics HOST:PORT``; issue 13).

Counters and the latency histogram are updated where things happen (the
session, the chunk stream), from the trio thread; prometheus-client's
metrics are thread-safe, and its HTTP server answers scrapes from its own
daemon thread. The fleet gauges (devices by version and state, push
deliveries and deployments by state, connected devices) come from the database, which only
the trio thread may touch: :func:`refresh_loop` copies them into the gauges
every ``refresh`` seconds, so a scrape never queries SQLite and a scrape
storm costs the releaser nothing. Every metric lives in the releaser's own
:class:`~prometheus_client.CollectorRegistry`, never the process-global one,
so two releasers in one process (tests, the demo) keep separate figures.

The names are documented in README.md ("Metrics"); they are an interface.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Final
from wsgiref.simple_server import WSGIRequestHandler, make_server

import attrs
import trio
from fleetpush.protocol import ErrorCode
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from .errors import ConfigError

log = logging.getLogger("fleetpush.server.metrics")

#: Seconds between two copies of the fleet figures into the gauges.
REFRESH_INTERVAL: Final = 5.0

#: Request latency buckets (seconds): a check is ~1 ms on loopback, a chunk
#: stream of a big release takes seconds.
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)


@attrs.frozen
class FleetFigures:
    """What :func:`refresh_loop` copies into the gauges (counted through the db runner)."""

    connected: int
    by_version: Mapping[str, int]
    by_state: Mapping[str, int]
    deliveries: Mapping[str, int]
    #: deployments by state (§7.7.1)
    deployments: Mapping[str, int] = attrs.field(factory=dict)


class Metrics:
    """Every metric of one releaser, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The standard process_* (RSS, CPU, open fds) and python_info metrics.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.bytes_served = Counter(
            "fleetpush_chunk_bytes_served", "Chunk bytes sent to devices.", registry=r
        )
        # LAN peer delivery (§7.11): what devices report they got, by source.
        self.delivered_bytes = Counter(
            "fleetpush_delivered_bytes",
            "Release bytes devices report downloading, by source (peers, releaser).",
            ["source"],
            registry=r,
        )
        self.chunks_served = Counter(
            "fleetpush_chunks_served", "Chunks sent to devices.", registry=r
        )
        self.handshake_failures = Counter(
            "fleetpush_handshake_failures",
            "Connections refused before or during the handshake, by reason (an error code).",
            ["reason"],
            registry=r,
        )
        self.requests = Histogram(
            "fleetpush_request_duration_seconds",
            "Time to answer a request, by method (a chunk stream counts until its last frame).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_errors = Counter(
            "fleetpush_request_errors",
            "Requests answered with an error, by method and error code.",
            ["method", "code"],
            registry=r,
        )
        self.pushes_created = Counter(
            "fleetpush_pushes_created", "Operator pushes created.", registry=r
        )
        self.connected = Gauge(
            "fleetpush_connected_devices", "Authenticated device connections.", registry=r
        )
        self.devices_by_version = Gauge(
            "fleetpush_devices_by_version",
            "Accepted devices by installed version.",
            ["version"],
            registry=r,
        )
        self.devices_by_state = Gauge(
            "fleetpush_devices_by_state",
            "Accepted devices by update state (PROTOCOL.md §7.6).",
            ["state"],
            registry=r,
        )
        self.deliveries = Gauge(
            "fleetpush_push_deliveries",
            "Push deliveries (one per target device) by delivery state.",
            ["state"],
            registry=r,
        )
        self.deployments = Gauge(
            "fleetpush_deployments",
            "Deployments by state (running, paused, halted, aborted, completed).",
            ["state"],
            registry=r,
        )

    @staticmethod
    def code_name(code: int) -> str:
        """An error code's label: its name, or ``other`` (labels stay a bounded set)."""
        try:
            return ErrorCode(code).name
        except ValueError:
            return "other"

    @contextmanager
    def timed(self, method: str) -> Iterator[None]:
        """Observe the block's duration under ``method`` (bounded: a route name)."""
        start = trio.current_time()
        try:
            yield
        finally:
            self.requests.labels(method).observe(trio.current_time() - start)

    def set_fleet(self, figures: FleetFigures) -> None:
        self.connected.set(figures.connected)
        # Values that disappeared (the last device left a version) must go to
        # zero, not linger at their last count: clear, then set.
        for gauge, counts in (
            (self.devices_by_version, figures.by_version),
            (self.devices_by_state, figures.by_state),
            (self.deliveries, figures.deliveries),
            (self.deployments, figures.deployments),
        ):
            gauge.clear()
            for label, n in counts.items():
                gauge.labels(label).set(n)


async def refresh_loop(
    metrics: Metrics,
    figures: Callable[[], Awaitable[FleetFigures]],
    interval: float = REFRESH_INTERVAL,
) -> None:
    """Copy ``await figures()`` into the gauges (on the trio thread), now and every ``interval``."""
    while True:
        try:
            metrics.set_fleet(await figures())
        except Exception:
            # A metrics failure must never stop the releaser; the gauges keep
            # their last values and the log says why.
            log.exception("reading the fleet figures for metrics failed")
        await trio.sleep(interval)


class _QuietHandler(WSGIRequestHandler):
    """wsgiref logs every request to stderr; scrapes every 15 s would flood it."""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics: " + format, *args)


@attrs.define
class MetricsServer:
    """The scrape endpoint's HTTP server, running in a daemon thread."""

    httpd: ThreadingWSGIServer
    thread: threading.Thread

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_server(
    metrics: Metrics, host: str, port: int, tls: ssl.SSLContext | None = None
) -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` (0: any free port), with TLS if given.

    Raises :class:`ConfigError` when the address cannot be bound.
    """
    app = make_wsgi_app(metrics.registry)
    try:
        httpd = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)
