"""What the operator commands share: the console config, options, output, exit codes.

The console config is a TOML file (README.md, "Console config")::

    server = "127.0.0.1:7878"          # the releaser's address, or a list: ["a:7878", "b:7878"]
    operator_key = "operator.key"      # PEM private key made by `fleetpush keygen`
    operator_name = "ops"              # the name the releaser records for changes
    data_dir = "/var/lib/fleetpush"    # releaser data dir, for `release publish`
    release_keys = ["release.key"]     # signing keys for `release publish`
    timeout = 10                       # seconds per request
    tls_pin = "ab12..."                # pin the releaser certificate's SHA-256 (printed
                                       # by `fleetpush server`) ...
    tls_ca = "ca.pem"                  # ... or trust this CA (or the certificate itself)
    insecure = false                   # true: plain TCP (closed networks only)

One of ``tls_pin``, ``tls_ca`` or ``insecure = true`` is required to talk to
the releaser (issue 10, item 14; specs/THREATS.md, "Transport modes"): over
plain TCP a man in the middle can revoke, reject and push in the operator's name.

It is read from ``--config PATH``, else ``$FLEETPUSH_CONFIG``, else
``~/.config/fleetpush/console.toml`` when that exists. Relative paths in it
are relative to the file. Flags override every setting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetpush.net.dial import DEFAULT_PORT
from fleetpush.net.tls import ClientTls
from fleetpush.operator import (
    OperatorClient,
    OperatorError,
    connect,
)
from fleetpush.protocol import FleetpushError
from fleetpush.protocol.keys import KeyFormatError, private_key_from_pem

from . import failures
from .failures import UsageError

T = TypeVar("T")
ENV_CONFIG = "FLEETPUSH_CONFIG"
#: releaser address(es), ``a:7878,b:7878``: over the config file, under --server.
ENV_SERVER = "FLEETPUSH_SERVER"
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
NO_TRUST = (
    "no way to trust the releaser: set tls_pin (printed by fleetpush server) or tls_ca, "
    "or pass --insecure for plain TCP"
)
INSECURE_WARNING = (
    "fleetpush: warning: plain TCP (--insecure): anyone on the path can read and rewrite "
    "what you send the releaser"
)


@attrs.frozen
class ConsoleConfig:
    #: one ``HOST:PORT`` or several, comma-separated, tried in order (issue 15).
    server: str = DEFAULT_SERVER
    operator_key: Path | None = None
    operator_name: str = "operator"
    data_dir: Path | None = None
    release_keys: tuple[Path, ...] = ()
    timeout: float = 10.0
    tls_ca: Path | None = None
    #: one pin, or several (releasers with their own certificates): any matches.
    tls_pin: str | tuple[str, ...] | None = None
    insecure: bool = False
    source: Path | None = None

    def client_tls(self) -> ClientTls | None:
        """TLS settings for the releaser link; None for plain TCP when ``insecure``.

        A pin or CA wins over ``insecure``. Raises :class:`UsageError` when
        nothing says how to trust the releaser.
        """
        if self.tls_ca is None and self.tls_pin is None:
            if self.insecure:
                return None
            raise UsageError(NO_TRUST)
        return ClientTls(ca_file=self.tls_ca, pin_sha256=self.tls_pin)


_KNOWN = {
    "server",
    "operator_key",
    "operator_name",
    "data_dir",
    "release_keys",
    "timeout",
    "tls_ca",
    "tls_pin",
    "insecure",
}


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleetpush" / "console.toml"


def load_config(path: Path | None) -> ConsoleConfig:
    """Read the console config (see the module docstring). Raises :class:`UsageError`."""
    explicit = path is not None or bool(os.environ.get(ENV_CONFIG))
    if path is None:
        env = os.environ.get(ENV_CONFIG)
        path = Path(env) if env else default_config_path()
    if not path.exists():
        if explicit:
            raise UsageError(f"config file {path} does not exist")
        return ConsoleConfig()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"cannot read config {path}: {e}") from e
    unknown = set(data) - _KNOWN
    if unknown:
        raise UsageError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    base = path.parent

    def rel(value: object, name: str) -> Path:
        if not isinstance(value, str):
            raise UsageError(f"{path}: {name} must be a string")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    cfg = ConsoleConfig(source=path)
    if "server" in data:
        server = data["server"]
        if isinstance(server, list) and server and all(isinstance(a, str) for a in server):
            server = ",".join(server)  # connect() tries them in this order
        if not isinstance(server, str):
            raise UsageError(
                f"{path}: server must be a string like 127.0.0.1:7878 or a list of them"
            )
        cfg = attrs.evolve(cfg, server=server)
    if "operator_key" in data:
        cfg = attrs.evolve(cfg, operator_key=rel(data["operator_key"], "operator_key"))
    if "operator_name" in data:
        cfg = attrs.evolve(cfg, operator_name=str(data["operator_name"]))
    if "data_dir" in data:
        cfg = attrs.evolve(cfg, data_dir=rel(data["data_dir"], "data_dir"))
    if "release_keys" in data:
        keys = data["release_keys"]
        if not isinstance(keys, list):
            raise UsageError(f"{path}: release_keys must be a list of key files")
        cfg = attrs.evolve(cfg, release_keys=tuple(rel(k, "release_keys") for k in keys))
    if "timeout" in data:
        if not isinstance(data["timeout"], int | float) or data["timeout"] <= 0:
            raise UsageError(f"{path}: timeout must be a positive number of seconds")
        cfg = attrs.evolve(cfg, timeout=float(data["timeout"]))
    if "tls_ca" in data:
        cfg = attrs.evolve(cfg, tls_ca=rel(data["tls_ca"], "tls_ca"))
    if "tls_pin" in data:
        pin = data["tls_pin"]
        pins = tuple(str(p) for p in pin) if isinstance(pin, list) else str(pin)
        if not pins:
            raise UsageError(f"{path}: tls_pin must be a pin or a non-empty list of pins")
        cfg = attrs.evolve(cfg, tls_pin=pins)
    if "insecure" in data:
        if not isinstance(data["insecure"], bool):
            raise UsageError(f"{path}: insecure must be true or false")
        cfg = attrs.evolve(cfg, insecure=data["insecure"])
    return cfg


def resolve(args: argparse.Namespace) -> ConsoleConfig:
    """The config file with the command's flags applied over it."""
    cfg = load_config(getattr(args, "config", None))
    if getattr(args, "server", None):
        cfg = attrs.evolve(cfg, server=args.server)
    elif os.environ.get(ENV_SERVER):
        cfg = attrs.evolve(cfg, server=os.environ[ENV_SERVER])
    if getattr(args, "operator_key", None):
        cfg = attrs.evolve(cfg, operator_key=args.operator_key)
    if getattr(args, "name", None):
        cfg = attrs.evolve(cfg, operator_name=args.name)
    if getattr(args, "timeout", None):
        cfg = attrs.evolve(cfg, timeout=args.timeout)
    if getattr(args, "tls_ca", None):
        cfg = attrs.evolve(cfg, tls_ca=args.tls_ca)
    if getattr(args, "tls_pin", None):
        # several pins, comma-separated, as for --server
        pins = tuple(p.strip() for p in str(args.tls_pin).split(",") if p.strip())
        cfg = attrs.evolve(cfg, tls_pin=pins[0] if len(pins) == 1 else pins)
    if getattr(args, "insecure", False):
        cfg = attrs.evolve(cfg, insecure=True)
    if getattr(args, "data_dir", None):
        cfg = attrs.evolve(cfg, data_dir=args.data_dir)
    return cfg


def load_private_key(path: Path, what: str) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key. Raises :class:`UsageError`."""
    try:
        return private_key_from_pem(path.read_bytes())
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except KeyFormatError as e:
        raise UsageError(f"{what} {path}: {e}") from e


# --- argparse helpers ------------------------------------------------------------


def config_parent() -> argparse.ArgumentParser:
    """Options every command that reads the console config accepts."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("console config (flags override the config file)")
    g.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"console config TOML (default: ${ENV_CONFIG}, else {default_config_path()})",
    )
    return p


def connection_parent() -> argparse.ArgumentParser:
    """Options of the commands that talk to the releaser."""
    p = config_parent()
    g = p.add_argument_group("releaser connection")
    g.add_argument(
        "--server",
        metavar="HOST:PORT[,...]",
        help=f"releaser address(es), tried in order (${ENV_SERVER}, {DEFAULT_SERVER})",
    )
    g.add_argument(
        "--operator-key", type=Path, metavar="KEYFILE", help="operator private key (PEM)"
    )
    g.add_argument("--name", metavar="NAME", help="operator name recorded by the releaser")
    g.add_argument("--timeout", type=float, metavar="SECONDS", help="per-request deadline (10)")
    g.add_argument("--tls-ca", type=Path, metavar="FILE", help="connect over TLS, trusting FILE")
    g.add_argument(
        "--tls-pin",
        metavar="SHA256",
        help="connect over TLS, pinning the cert (the 'tls pin' fleetpush server prints)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="plain TCP when no pin or CA is set (closed networks only)",
    )
    return p


def json_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    return p


# --- running -------------------------------------------------------------------------


def exit_code_for(e: BaseException) -> int:
    """The exit code for an error (README.md, "Exit codes"; the table is in
    :mod:`fleetpush.cli.failures`)."""
    return failures.exit_code_for(e)


def fail(e: BaseException) -> int:
    """Print the one line for ``e``; its exit code."""
    print(f"fleetpush: {failures.message(e)}", file=sys.stderr)
    return exit_code_for(e)


def run_operator(args: argparse.Namespace, body: Callable[[OperatorClient], Awaitable[int]]) -> int:
    """Connect with the resolved config, run ``body``, map errors to exit codes."""
    try:
        cfg = resolve(args)
        if cfg.operator_key is None:
            raise UsageError(
                "no operator key: pass --operator-key KEYFILE or set operator_key in the "
                "console config (make one with `fleetpush keygen`)"
            )
        key = load_private_key(cfg.operator_key, "operator key")
        tls = cfg.client_tls()
        if tls is None:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)

        async def main() -> int:
            async with connect(
                cfg.server,
                key,
                name=cfg.operator_name,
                timeout=cfg.timeout,
                tls=tls,
            ) as client:
                return await body(client)

        return trio.run(main)
    except (OperatorError, UsageError) as e:
        return fail(e)
    except FleetpushError as e:
        return fail(e)


# --- output ---------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    if attrs.has(type(obj)):
        return {k: to_jsonable(v) for k, v in attrs.asdict(obj, recurse=False).items()}
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def print_json(obj: Any) -> None:
    json.dump(to_jsonable(obj), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()
