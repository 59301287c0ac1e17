"""Serve the dashboard from the releaser's own trio process, with hypercorn's trio worker.

hypercorn rather than a hand-written HTTP server: it is trio-native (no
second event loop, no thread), speaks HTTP/1.1 and HTTP/2 over TLS, and
handles the parts that are easy to get wrong (keep-alive, pipelining,
request size limits, slow clients). TLS uses the releaser's certificate
when the releaser serves TLS (issue 16: "TLS like the releaser's port").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio
from fleetpush.protocol.messages import StatusResult
from hypercorn.config import Config
from hypercorn.trio import serve

from fleetpush.net.dial import format_address, parse_address

from ..errors import ConfigError
from ..services import Services
from .chart import VersionHistory
from .ops import Operations
from .site import Dashboard

log = logging.getLogger("fleetpush.server.web")


def hypercorn_config(address: str, tls: tuple[Path, Path] | None) -> Config:
    """hypercorn's settings for ``address`` (HOST:PORT), with TLS from (cert, key)."""
    host, port = parse_address(address, listen=True)
    config = Config()
    config.bind = [format_address(host, port)]
    config.accesslog = None
    config.errorlog = logging.getLogger("fleetpush.server.web.http")
    config.include_server_header = False
    config.keep_alive_timeout = 30
    config.graceful_timeout = 1.0
    config.h11_max_incomplete_size = 64 * 1024
    if tls is not None:
        config.certfile, config.keyfile = str(tls[0]), str(tls[1])
    return config


async def serve_dashboard(
    services: Services,
    routes: Mapping[str, Any],
    address: str,
    tls: tuple[Path, Path] | None,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dashboard on ``address`` until cancelled; reports its base URL.

    Raises :class:`ConfigError` when the address cannot be bound.
    """
    ops = Operations(services, routes)
    history = VersionHistory()

    async def by_version() -> dict[str, int]:
        status: StatusResult = await ops.call("dashboard", "status", None)
        return status.by_version

    dashboard = Dashboard(ops, history=history)
    config = hypercorn_config(address, tls)
    started = False
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(serve, dashboard, config)
            log.info("web dashboard on %s", binds[0])
            nursery.start_soon(history.run, by_version)
            started = True
            task_status.started(binds[0])
    except BaseExceptionGroup as group:
        # hypercorn binds inside its own nurseries: a taken port arrives as a
        # group holding an OSError, before anything was served.
        bind_errors = group.split(OSError)[0]
        if started or bind_errors is None:
            raise
        first = _first_leaf(bind_errors)
        raise ConfigError(f"cannot serve the dashboard on {address}: {first}") from group


def _first_leaf(group: BaseExceptionGroup[OSError]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf
