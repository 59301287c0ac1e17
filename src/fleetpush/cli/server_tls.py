"""`fleetpush server`'s transport policy: TLS by default, plain TCP only when asked.

The library's :class:`fleetpush.server.ServerConfig` stays explicit (plain TCP
unless ``tls_cert``/``tls_key`` are given), so releasers embedded in tests and
apps do not change. The *command* is secure by default (issue 10, item 14;
specs/THREATS.md, "Transport modes"): without a configured certificate and
without ``--insecure`` it makes a self-signed one in the data dir on first
start (:func:`fleetpush.net.tls.ensure_self_signed`), reuses it afterwards,
and prints its SHA-256 pin, which operators and devices set as ``tls_pin``.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any, Final

import attrs

from fleetpush.net.tls import (
    default_server_names,
    ensure_self_signed,
    pem_fingerprint,
    self_signed_paths,
)
from fleetpush.protocol import FleetpushError

#: server.toml settings read here, not by ServerConfig.
CLI_SETTINGS: Final = ("insecure", "tls_names")

INSECURE_WARNING: Final = (
    "fleetpush server: warning: --insecure: plain TCP, anyone on the path can read and "
    'rewrite operator commands and device reports (README.md, "TLS")'
)


class TransportConfigError(FleetpushError):
    """The TLS settings contradict each other, or the certificate is missing."""


@attrs.frozen
class Transport:
    """What the command decided: plain TCP, or TLS with the pin to print."""

    insecure: bool
    pin: str | None = None
    created: Path | None = None  # the certificate made at this start, if any


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of this policy on the ``server`` parser."""
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve plain TCP (closed networks only; default: TLS with a certificate made "
        "in the data dir on first start)",
    )
    p.add_argument(
        "--tls-name",
        action="append",
        metavar="NAME",
        dest="tls_names",
        help="extra DNS name or IP for the self-signed certificate made on first start "
        "(repeatable; it always has localhost, 127.0.0.1, ::1 and the host name)",
    )
    p.add_argument(
        "--print-pin",
        action="store_true",
        help="print the releaser certificate's SHA-256 pin and exit (creates nothing)",
    )


def cli_settings(args: argparse.Namespace) -> tuple[bool, list[str]]:
    """``(insecure, tls_names)`` from the flags over server.toml.

    Raises :class:`TransportConfigError` for a malformed setting in the file.
    """
    insecure: bool = False
    names: list[str] = []
    if args.config is not None:
        table = _toml_table(args.config)
        value = table.get("insecure", False)
        if not isinstance(value, bool):
            raise TransportConfigError(f"{args.config}: insecure must be true or false")
        insecure = value
        raw = table.get("tls_names", [])
        if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
            raise TransportConfigError(f"{args.config}: tls_names must be a list of names")
        names = list(raw)
    if args.insecure is not None:
        insecure = bool(args.insecure)
    if args.tls_names:
        names = list(args.tls_names)
    return insecure, names


def _toml_table(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise TransportConfigError(f"cannot read {path}: {e}") from e
    table = raw.get("server", raw)
    return table if isinstance(table, dict) else {}


def decide(config: Any, *, insecure: bool, names: list[str]) -> tuple[Any, Transport]:
    """The config to serve with (TLS filled in) and what to tell the operator.

    With ``insecure``: the config unchanged (a configured certificate is a
    contradiction). With a configured certificate: it, and its pin. Otherwise
    the self-signed certificate in the data dir, made now if it is missing.
    Raises :class:`TransportConfigError` or :class:`fleetpush.net.tls.TlsError`.
    """
    has_cert = config.tls_cert is not None or config.tls_key is not None
    if insecure:
        if has_cert or config.tls_client_ca is not None:
            raise TransportConfigError(
                "--insecure (insecure = true) contradicts tls_cert/tls_key/tls_client_ca: "
                "drop one of them"
            )
        return config, Transport(insecure=True)
    if has_cert:
        if config.tls_cert is None or config.tls_key is None:
            raise TransportConfigError("tls_cert and tls_key go together: set both")
        return config, Transport(insecure=False, pin=pem_fingerprint(config.tls_cert))
    cert, key, created = ensure_self_signed(
        Path(config.data_dir), [*default_server_names(), *names]
    )
    config = attrs.evolve(config, tls_cert=cert, tls_key=key)
    return config, Transport(
        insecure=False, pin=pem_fingerprint(cert), created=cert if created else None
    )


def stored_pin(config: Any) -> str:
    """The pin ``fleetpush server`` serves with, read without creating anything.

    Raises :class:`TransportConfigError` when there is no certificate yet, or
    :class:`fleetpush.net.tls.TlsError` when it is unreadable.
    """
    if config.tls_cert is not None:
        return pem_fingerprint(config.tls_cert)
    cert, _key = self_signed_paths(Path(config.data_dir))
    if not cert.exists():
        raise TransportConfigError(
            f"no releaser certificate at {cert}: `fleetpush server --data-dir "
            f"{config.data_dir}` makes it on its first start (without --insecure)"
        )
    return pem_fingerprint(cert)
