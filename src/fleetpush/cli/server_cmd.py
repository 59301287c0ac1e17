"""`fleetpush server`: run the releaser (built in server/).

Settings come from ``--config server.toml`` (same names as
:class:`fleetpush.server.ServerConfig`, plus ``insecure`` and ``tls_names``,
see :mod:`.server_tls`), and each flag overrides the file. Once listening it
prints ``tls pin: HEX`` (unless ``--insecure``), ``metrics on URL`` and
``web dashboard on URL`` when those are served, and then ``listening on
HOST:PORT`` to stdout, nothing else.
SIGTERM and SIGINT stop it gracefully (see fleetpush.server.app) with exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from . import server_tls
from .exitcodes import EXIT_OK, EXIT_USAGE

log = logging.getLogger("fleetpush.server")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "server",
        help="run the releaser",
        description=(
            "Run the releaser: devices keep a connection to it, operators connect with the "
            "operator role. Settings come from --config (TOML, same names as below with "
            "underscores, e.g. max_connections = 500); flags override the file. Serves TLS "
            "by default with a certificate made in the data dir on first start; prints "
            "'tls pin: HEX' and then 'listening on HOST:PORT' once listening; SIGTERM/SIGINT "
            "stop it gracefully."
        ),
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="server.toml to read settings from")
    p.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="where releases and the SQLite database live (created if missing; required "
        "here or in the config)",
    )
    p.add_argument(
        "--database",
        metavar="URL",
        help="postgresql://user@host:port/db: keep the releaser's state in PostgreSQL "
        "(needs the postgres extra) instead of the SQLite file in the data dir",
    )
    p.add_argument(
        "--database-pool",
        type=int,
        metavar="N",
        help="PostgreSQL connections for database calls made off the event loop "
        "(default 8; 0: every call on the event loop's one connection)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:7878; port 0 picks a free port)",
    )
    p.add_argument(
        "--enrollment",
        choices=("auto", "manual"),
        help="new devices: auto-accept (default) or pending until an operator accepts them",
    )
    p.add_argument(
        "--operator-key",
        action="append",
        metavar="HEX",
        dest="operator_keys",
        help="Ed25519 public key (hex) allowed to connect as an operator (repeatable; "
        "replaces the config's list)",
    )
    p.add_argument(
        "--release-key",
        action="append",
        metavar="HEX",
        dest="release_keys",
        help="Ed25519 release public key (hex); when any is set, publishing refuses manifests "
        "not signed by --threshold of them (repeatable)",
    )
    p.add_argument(
        "--threshold",
        type=int,
        metavar="N",
        dest="release_threshold",
        help="release signatures a manifest needs (default 1)",
    )
    p.add_argument(
        "--timestamp-key",
        type=Path,
        metavar="KEYFILE",
        help="online timestamp key (PEM) signing freshness statements; its public key must "
        "be in the published root's timestamp role (README.md, Root of trust)",
    )
    p.add_argument(
        "--freshness-expiry",
        type=float,
        metavar="SECONDS",
        help="how long a freshness statement is valid (default 3600)",
    )
    p.add_argument(
        "--server-id",
        metavar="ID",
        help="server id (default: generated once, kept in the data dir)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="authenticated connections (devices and operators) at once (default 2000)",
    )
    p.add_argument(
        "--max-handshaking",
        type=int,
        metavar="N",
        help="connections still in their handshake at once; they do not count against "
        "--max-connections (default 256)",
    )
    p.add_argument(
        "--max-handshaking-per-source",
        type=int,
        metavar="N",
        help="connections in their handshake from one source address (default 16)",
    )
    p.add_argument(
        "--busy-handshake-timeout",
        type=float,
        metavar="SECONDS",
        help="the handshake deadline once more than half of --max-handshaking is in use "
        "(default 2)",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        metavar="SECONDS",
        help="heartbeat interval; a peer silent for 3 of them is dropped (default 15)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        metavar="SECONDS",
        help="time a new connection has to authenticate (default 10)",
    )
    p.add_argument(
        "--frame-timeout",
        type=float,
        metavar="SECONDS",
        help="time a started frame has to arrive completely (default 30)",
    )
    p.add_argument(
        "--send-timeout",
        type=float,
        metavar="SECONDS",
        help="time each write may take before a non-reading peer is dropped (default 30)",
    )
    p.add_argument(
        "--grace-period",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long chunk streams in flight may finish (default 10)",
    )
    p.add_argument(
        "--chunk-cache-mb",
        type=int,
        metavar="MB",
        help="memory for verified chunks shared by all downloads (default 48)",
    )
    p.add_argument(
        "--max-disk-reads",
        type=int,
        metavar="N",
        help="chunk reads and hashes running at once in worker threads (default 4)",
    )
    p.add_argument(
        "--chunk-stall-timeout",
        type=float,
        metavar="SECONDS",
        help="a download whose send has been blocked this long is closed when others wait "
        "for room in the chunk cache (default 5)",
    )
    p.add_argument(
        "--watch-queue-kb",
        type=int,
        metavar="KB",
        help="events queued per watching operator, in KiB; more are dropped with a notice "
        "(default 4096)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="serve TLS with this certificate (with --tls-key); without it a self-signed "
        "one is made in the data dir on first start",
    )
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http(s)://HOST:PORT/metrics (off by default; "
        "HTTPS with the releaser's certificate unless --insecure)",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the operator web dashboard at http(s)://HOST:PORT/ (off by default; "
        "HTTPS with the releaser's certificate unless --insecure; sign in with "
        "`fleetpush operator web-login`)",
    )
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="mutual TLS: devices need a certificate from this CA naming their device id",
    )
    p.add_argument(
        "--store",
        metavar="s3://BUCKET/PREFIX",
        help="the S3-compatible object store releases are published to (`release publish "
        "--store`); chunks of those releases are read from it through the chunk cache",
    )
    p.add_argument(
        "--store-endpoint",
        metavar="URL",
        help="the object store's endpoint, e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL; "
        "credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
    )
    server_tls.add_arguments(p)
    p.set_defaults(func=_run)


def _config(args: argparse.Namespace) -> Any:
    from fleetpush.server import ServerConfig

    overrides: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "data_dir",
            "database",
            "database_pool",
            "enrollment",
            "operator_keys",
            "release_keys",
            "release_threshold",
            "server_id",
            "max_connections",
            "max_handshaking",
            "max_handshaking_per_source",
            "busy_handshake_timeout",
            "chunk_stall_timeout",
            "heartbeat",
            "handshake_timeout",
            "frame_timeout",
            "send_timeout",
            "grace_period",
            "max_disk_reads",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "metrics",
            "http",
            "timestamp_key",
            "freshness_expiry",
            "store",
            "store_endpoint",
        )
    }
    if args.watch_queue_kb is not None:
        overrides["watch_queue_bytes"] = args.watch_queue_kb * 1024
    if args.chunk_cache_mb is not None:
        overrides["chunk_cache_bytes"] = args.chunk_cache_mb * 1024 * 1024
    if args.listen is not None:
        overrides["listen"] = args.listen
    if args.config is not None:
        listen = overrides.pop("listen", None)
        if listen is not None:
            from fleetpush.server.config import parse_listen

            overrides["host"], overrides["port"] = parse_listen(listen)
        return ServerConfig.from_toml(args.config, ignore=server_tls.CLI_SETTINGS, **overrides)
    return ServerConfig.from_mapping(
        {k: v for k, v in overrides.items() if v is not None}, where="flags"
    )


def _run(args: argparse.Namespace) -> int:
    from fleetpush.protocol import FleetpushError

    try:
        config = _config(args)
        insecure, tls_names = server_tls.cli_settings(args)
        if args.print_pin:
            print(server_tls.stored_pin(config), flush=True)
            return EXIT_OK
        config, transport = server_tls.decide(config, insecure=insecure, names=tls_names)
    except FleetpushError as e:
        print(f"fleetpush server: {e}", file=sys.stderr)
        return EXIT_USAGE
    if transport.insecure:
        print(server_tls.INSECURE_WARNING, file=sys.stderr, flush=True)
    elif transport.created is not None:
        log.warning("made a self-signed certificate %s", transport.created)
    from fleetpush.server import gc_policy

    # A process-wide collector policy for a process that only serves (see
    # server/gc_policy.py); the library's Server leaves the collector alone.
    gc_policy.install()
    raise_fd_limit()
    try:
        trio.run(_main, config, transport.pin)
    except (FleetpushError, BaseExceptionGroup) as e:
        # serve() fails inside the nursery: one line, not the group's traceback.
        # A port in use is the releaser's ConfigError: exit 2, the --listen
        # setting must change (README.md, "Exit codes").
        from .failures import report, unwrap

        if not isinstance(unwrap(e), FleetpushError):
            raise
        return report(e, verbose=args.verbose > 0, prefix="fleetpush server")
    return EXIT_OK


def raise_fd_limit() -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, and log it (issue 10, item 7).

    Every connection and every chunk read takes a descriptor: at the usual
    1024 soft limit a busy releaser hit EMFILE. Returns the (old, new) soft
    limits, or None where there is no such limit (Windows) or it cannot be
    raised (logged).
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft >= hard:
            log.info("open files limit: %d", soft)
            return soft, soft
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        log.warning("could not raise the open files limit: %s", e)
        return None
    log.warning("open files limit raised from %d to %d", soft, target)
    return soft, target


async def _main(config: Any, pin: str | None) -> None:
    from fleetpush.net.dial import format_address
    from fleetpush.server import serve

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve, config)
            if pin is not None:
                # before "listening on": whoever waits for that line has the pin too
                print(f"tls pin: {pin}", flush=True)
            if handle.metrics_url is not None:
                print(f"metrics on {handle.metrics_url}", flush=True)
            if handle.http_url is not None:
                print(f"web dashboard on {handle.http_url}", flush=True)
            print(f"listening on {format_address(handle.host, handle.port)}", flush=True)
            async for signum in signals:
                log.warning("%s: stopping gracefully", signal.Signals(signum).name)
                handle.stop()
                break
