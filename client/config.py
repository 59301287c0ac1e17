"""Device configuration: :class:`UpdaterConfig`, usually read from ``agent.toml``.

One flat set of settings is shared by the embedded :class:`Updater`, the
``fleetpush agent`` supervisor and ``fleetpush update``. In TOML the keys may
sit at the top level or inside ``[device]``, ``[updater]`` and ``[agent]``
tables (all flattened; a key given twice is an error). Relative paths are
resolved against the TOML file's directory, so a config directory can be moved
as a whole. Example::

    server = "releaser.example:7878"   # or a list: ["a.example:7878", "b.example:7878"]
    app = "sensor"
    version = "1.0.0"            # the version installed before the first update
    state_dir = "state"
    app_root = "app"
    root = "root-1.json"         # the root of trust (fleetpush root init), or, legacy:
    trusted_keys = ["3b6a27bc..."]   # hex Ed25519 release public keys
    threshold = 1
    tls_pin = "f9ff3ea1..."      # the pin `fleetpush server` prints (or tls_ca,
                                 # or insecure = true for plain TCP)

    [agent]
    command = ["python3", "app/main.py"]
    trial_seconds = 30
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs
from attrs import field, frozen
from fleetpush.protocol.errors import FleetpushError, VersionError
from fleetpush.protocol.keys import KeyFormatError, public_key_from_hex
from fleetpush.protocol.trust import TrustRoot
from fleetpush.protocol.versions import canonical_version

from fleetpush.net.dial import DEFAULT_PORT, AddressError, parse_address
from fleetpush.net.tls import ClientTls

from .activity_policy import UNKNOWN_CHOICES, Window
from .data_settings import check_data_path, parse_age
from .health import parse_listen

CHANNELS: Final = ("stable", "beta")
ENV_BUILDERS: Final = ("auto", "uv", "pip")


class ConfigError(FleetpushError):
    """The device configuration is missing, malformed or inconsistent."""


NO_TRUST: Final = (
    "no way to trust the releaser: set tls_pin (printed by fleetpush server) or tls_ca, "
    "or set insecure = true for plain TCP"
)


def _number(attr: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{attr.name} must be a number, got {value!r}")


def _positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    _number(attr, value)
    if value <= 0:
        raise ConfigError(f"{attr.name} must be positive, got {value!r}")


def _non_negative(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    _number(attr, value)
    if value < 0:
        raise ConfigError(f"{attr.name} must not be negative, got {value!r}")


def _choices(options: Any) -> str:
    """``stable or beta``; ``a, b or c``."""
    names = [str(o) for o in options]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _invalid_setting(e: TypeError | ValueError) -> str:
    """One sentence for an attrs validator's error, never its ``Attribute(...)`` dump.

    attrs' ``in_`` and ``instance_of`` raise ``(message, attribute, expected,
    value)``; anything else (a wrong keyword, ``min_len``) says enough in its
    first argument.
    """
    args = e.args
    if len(args) == 4 and isinstance(args[1], attrs.Attribute):
        name, expected, got = args[1].name, args[2], args[3]
        if isinstance(expected, type):
            return f"{name} must be of type {expected.__name__}, got {got!r}"
        if isinstance(expected, tuple) and all(isinstance(t, type) for t in expected):
            return f"{name} must be of type {_choices(t.__name__ for t in expected)}, got {got!r}"
        return f"{name} must be {_choices(expected)}, got {got!r}"
    return str(args[0]) if args else type(e).__name__


def server_address(text: str) -> tuple[str, int]:
    """The ``server`` setting as ``(host, port)`` (:func:`fleetpush.net.dial.parse_address`).

    Raises :class:`ConfigError`.
    """
    try:
        return parse_address(text)
    except AddressError as e:
        raise ConfigError(f"server: {e}") from e


def _check_window(_inst: object, _attr: object, value: str | None) -> None:
    if value is not None:
        try:
            Window.parse(value)  # HH:MM[:SS]-HH:MM[:SS]
        except ValueError as e:
            raise ConfigError(str(e)) from e


def _whole_positive(_inst: object, attr: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{attr.name} must be a whole number >= 1, got {value!r}")


def _check_keys(_inst: object, _attr: object, value: tuple[str, ...]) -> None:
    for k in value:
        try:
            public_key_from_hex(k)
        except KeyFormatError as e:
            raise ConfigError(f"trusted_keys: {e}") from e


def _check_listen(_inst: object, _attr: object, value: str | None) -> None:
    if value is not None:
        parse_listen(value)  # ValueError: reported as a bad setting


def _check_version(_inst: object, _attr: object, value: str | None) -> None:
    if value is not None:
        try:
            canonical_version(value)
        except VersionError as e:
            raise ConfigError(f"version: {e}") from e


def _check_data_paths(_inst: object, _attr: object, value: tuple[str, ...]) -> None:
    for path in value:
        try:
            check_data_path(path)
        except ValueError as e:
            raise ConfigError(f"data_paths: {e}") from e


def _count(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attr.name} must be a whole number >= 0, got {value!r}")


def _check_age(_inst: object, _attr: object, value: str | None) -> None:
    if value is not None:
        try:
            parse_age(value)
        except ValueError as e:
            raise ConfigError(f"backup_max_age: {e}") from e


def _check_server(_inst: object, _attr: object, value: str | tuple[str, ...]) -> None:
    addresses = server_list(value)
    if not addresses:
        raise ConfigError("server: no releaser address given (want HOST:PORT or a list of them)")
    for text in addresses:
        server_address(text)


def server_list(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """The ``server`` setting as a tuple of address texts.

    A string is one address, or several separated by commas (a comma is never
    part of an address, so ``--server a:1,b:2`` overrides a TOML list); a
    list is several (issue 15: any releaser of the fleet will do).
    """
    items = (value,) if isinstance(value, str) else value
    return tuple(p.strip() for item in items for p in item.split(",") if p.strip())


def _server_value(value: object) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"server: want an address or a list of addresses, got {value!r}")


def _pin_value(value: object) -> str | tuple[str, ...] | None:
    # Several releasers may each have their own self-signed certificate: any
    # listed pin then matches (src/fleetpush/net/tls.py, check_pin).
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"tls_pin: want a pin or a list of pins, got {value!r}")


def _tuple_of_str(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)  # type: ignore[attr-defined]


def _opt_command(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        import shlex

        return tuple(shlex.split(value))
    return tuple(str(v) for v in value)  # type: ignore[attr-defined]


@frozen(kw_only=True)
class UpdaterConfig:
    """Everything a device needs to know; see the module docstring for the TOML form."""

    # --- identity and trust ---------------------------------------------------
    app: str = field(validator=attrs.validators.min_len(1))
    state_dir: Path = field(converter=Path)
    #: where the app's files live; updates are installed here.
    app_root: Path = field(converter=Path)
    #: the version installed before the first update (state.json wins afterwards).
    version: str | None = field(default=None, validator=_check_version)
    device_id: str = field(factory=socket.gethostname, validator=attrs.validators.min_len(1))
    channel: str = field(default="stable", validator=attrs.validators.in_(CHANNELS))
    group: str | None = None
    #: hex Ed25519 public keys of the release signers, and how many must sign.
    #: Without ``root`` they are the implicit root v0 (legacy mode, PROTOCOL.md §8.5).
    trusted_keys: tuple[str, ...] = field(converter=_tuple_of_str, validator=_check_keys)
    threshold: int = 1
    #: the root file this device is provisioned with (root v1, ``fleetpush root init``);
    #: the newest root walked to since is kept in <state_dir>/root.json.
    root: Path | None = field(default=None, converter=attrs.converters.optional(Path))
    #: refuse a release older than the releaser's signed freshness statement
    #: promised (PROTOCOL.md §8.6; only under a root with a timestamp key).
    freshness_strict: bool = field(default=False, validator=attrs.validators.instance_of(bool))

    # --- the releaser connection --------------------------------------------------
    #: one ``HOST:PORT`` or a list of them (issue 15): the device fails over
    #: between them (client/failover.py).
    server: str | tuple[str, ...] = field(
        default=f"127.0.0.1:{DEFAULT_PORT}", converter=_server_value, validator=_check_server
    )
    connect_timeout: float = field(default=5.0, validator=_positive)
    check_timeout: float = field(default=5.0, validator=_positive)
    backoff_initial: float = field(default=0.5, validator=_positive)
    backoff_max: float = field(default=60.0, validator=_positive)
    #: with several servers: the first reconnect after a drop waits up to this
    #: long (uniformly), so the devices of a dead releaser do not all arrive at once.
    reconnect_spread: float = field(default=5.0, validator=_non_negative)
    heartbeat: float = field(default=15.0, validator=_positive)
    #: TLS to the releaser (src/fleetpush/net/tls.py): trust a CA file or pin the
    #: releaser certificate's SHA-256; cert/key for mutual TLS.
    tls_ca: Path | None = field(default=None, converter=attrs.converters.optional(Path))
    tls_pin: str | tuple[str, ...] | None = field(default=None, converter=_pin_value)
    tls_cert: Path | None = field(default=None, converter=attrs.converters.optional(Path))
    tls_key: Path | None = field(default=None, converter=attrs.converters.optional(Path))
    #: plain TCP when neither tls_ca nor tls_pin is set. Off by default: over
    #: plain TCP a man in the middle can forge this device's outcome reports
    #: (specs/THREATS.md, "Transport modes"), so it must be asked for.
    insecure: bool = field(default=False, validator=attrs.validators.instance_of(bool))

    # --- checking and downloading -----------------------------------------------
    auto_check: bool = True
    check_interval: float = field(default=3600.0, validator=_positive)
    #: chunks outstanding at once, and chunks per get_chunks request.
    window: int = field(default=16, validator=_positive)
    chunks_per_request: int = field(default=4, validator=_positive)
    #: threads verifying and writing chunks (hashing releases the GIL).
    io_threads: int = field(default=2, validator=_positive)
    #: bytes/s cap for downloads on metered links; 0 = unlimited.
    max_download_rate: float = field(default=0.0, validator=_non_negative)
    #: attempts at downloading one version before giving up until pushed again.
    max_download_attempts: int = field(default=5, validator=_positive)

    # --- applying, trial, commit --------------------------------------------------
    #: seconds the new version has to prove itself before it is rolled back.
    trial_seconds: float = field(default=60.0, validator=_positive)
    #: commit once the app has survived this long (None: needs confirm() or the
    #: health command).
    confirm_after: float | None = None
    #: command run during the trial; exit 0 commits.
    health_command: tuple[str, ...] | None = field(default=None, converter=_opt_command)
    health_interval: float = field(default=2.0, validator=_positive)
    #: starts of a new version (and apply attempts) before it is given up.
    max_attempts: int = field(default=3, validator=_positive)
    #: a forced update waits at the activity gate at most this long.
    force_deadline: float = field(default=300.0, validator=_non_negative)
    #: daily "HH:MM-HH:MM" (local time, may cross midnight): non-forced updates
    #: wait for it, and so does any update while >= wait_at users are active.
    maintenance_window: str | None = field(default=None, validator=_check_window)

    # --- the activity gate (client/activity_policy.py; README) ---------------------
    #: 1 .. notify_below-1 active users: notify the app, go after notify_wait s.
    notify_below: int = field(default=3, validator=_whole_positive)
    notify_wait: float = field(default=60.0, validator=_non_negative)
    #: this many active users or more: wait for the maintenance window.
    wait_at: int = field(default=3, validator=_whole_positive)
    #: a report older than this (s) is unknown activity, treated as activity_unknown.
    activity_max_age: float = field(default=300.0, validator=_positive)
    activity_unknown: str = field(default="go", validator=attrs.validators.in_(UNKNOWN_CHOICES))
    #: command printing the number of active users (instead of, or besides, reports).
    busy_command: tuple[str, ...] | None = field(default=None, converter=_opt_command)
    busy_timeout: float = field(default=5.0, validator=_positive)
    #: how often a waiting gate looks again without a new report (runs busy_command).
    activity_poll: float = field(default=5.0, validator=_positive)

    # --- data, schema, migrations, backups (data_settings.py; README "Python services") --
    #: the app's data files, backed up with the code before every apply and
    #: restored when a rollback undoes a migration: relative to ``app_root``
    #: (never outside it) or absolute.
    data_paths: tuple[str, ...] = field(
        factory=tuple, converter=_tuple_of_str, validator=_check_data_paths
    )
    #: run after the files are installed and before the app starts, when the
    #: data schema changes (FLEETPUSH_SCHEMA_FROM/TO in its env); exit 0 or rollback.
    migrate_command: tuple[str, ...] | None = field(default=None, converter=_opt_command)
    migrate_timeout: float = field(default=300.0, validator=_positive)
    #: backups kept (newest first; 0: no count limit) and the oldest kept ("7d").
    keep_backups: int = field(default=5, validator=_count)
    backup_max_age: str | None = field(default=None, validator=_check_age)

    # --- the supervisor (fleetpush agent) ----------------------------------------
    command: tuple[str, ...] | None = field(default=None, converter=_opt_command)
    #: working directory of the app (default: app_root).
    cwd: Path | None = field(default=None, converter=attrs.converters.optional(Path))
    stop_timeout: float = field(default=10.0, validator=_positive)
    restart_backoff_initial: float = field(default=1.0, validator=_positive)
    restart_backoff_max: float = field(default=30.0, validator=_positive)
    #: lines of the app's output the agent keeps (``fleetpush logs`` reads them;
    #: app_status carries the last 20).
    log_lines: int = field(default=1000, validator=_positive)
    status_interval: float = field(default=30.0, validator=_positive)
    #: "HOST:PORT" of the local health endpoint (client/health.py); None = off.
    health_listen: str | None = field(default=None, validator=_check_listen)

    # --- LAN peer delivery (client/p2p_agent.py, specs/PROTOCOL.md §7.11) ----------
    #: serve held releases to peers and ask the releaser for peers; off: no port.
    p2p: bool = field(default=False, validator=attrs.validators.instance_of(bool))
    p2p_listen: str = "0.0.0.0:7879"
    #: the LAN address peers reach this device on (None: what the releaser sees).
    p2p_host: str | None = None
    #: this device's LAN, e.g. "192.168.4.0/24": with its public address, "near".
    p2p_subnet: str | None = None
    p2p_max_peers: int = field(default=4, validator=_positive)
    #: upload bytes/s over all peer links (0: no cap).
    p2p_max_rate: float = field(default=0.0, validator=_non_negative)

    # --- a release's Python env (client/pyenv.py) --------------------------------
    #: the interpreter envs are made from (None: the one running fleetpush).
    env_python: str | None = None
    #: "auto" (uv when installed, else venv + pip), "uv" or "pip".
    env_builder: str = field(default="auto", validator=attrs.validators.in_(ENV_BUILDERS))

    def __attrs_post_init__(self) -> None:
        if self.trusted_keys:
            try:
                self.trust_root()
            except ValueError as e:
                raise ConfigError(f"threshold: {e}") from e
        if self.notify_below > self.wait_at:
            raise ConfigError("notify_below must not exceed wait_at")
        if self.backoff_initial > self.backoff_max:
            raise ConfigError("backoff_initial must not exceed backoff_max")
        if self.tls_ca is None and self.tls_pin is None and not self.insecure:
            raise ConfigError(NO_TRUST)

    def client_tls(self) -> ClientTls | None:
        """TLS settings for the releaser connection, or None for plain TCP (``insecure``)."""
        if self.tls_ca is None and self.tls_pin is None:
            if self.tls_cert is not None:
                raise ConfigError("tls_cert needs tls_ca or tls_pin to trust the releaser")
            return None
        return ClientTls(
            ca_file=self.tls_ca,
            pin_sha256=self.tls_pin,
            cert_file=self.tls_cert,
            key_file=self.tls_key,
        )

    def trust_root(self) -> TrustRoot:
        """The release keys and threshold as a :class:`TrustRoot`.

        Raises :class:`ConfigError` if no key is configured (a device that
        trusts nothing can install nothing).
        """
        if not self.trusted_keys:
            raise ConfigError(
                "no root and no trusted_keys configured: cannot verify any release "
                "[set root = the root file from fleetpush root init]"
            )
        return TrustRoot.from_public_keys(
            [public_key_from_hex(k) for k in self.trusted_keys], self.threshold
        )

    @property
    def address(self) -> tuple[str, int]:
        """The first configured releaser (the only one, for most devices)."""
        return server_address(self.servers[0])

    @property
    def servers(self) -> tuple[str, ...]:
        """Every configured releaser address, as written (see :func:`server_list`)."""
        return server_list(self.server)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, base: Path | None = None, **overrides: Any
    ) -> UpdaterConfig:
        """Build from a (TOML-shaped) mapping, then apply ``overrides``.

        Overrides whose value is None are ignored, so argparse results can be
        passed straight through. Raises :class:`ConfigError`.
        """
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("device", "updater", "agent") and isinstance(value, Mapping):
                for k, v in value.items():
                    if k in flat:
                        raise ConfigError(f"{k!r} is set twice")
                    flat[k] = v
            elif key in flat:
                raise ConfigError(f"{key!r} is set twice")
            else:
                flat[key] = value
        flat.update({k: v for k, v in overrides.items() if v is not None})
        names = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(flat) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        if base is not None:
            for key in ("state_dir", "app_root", "cwd", "tls_ca", "tls_cert", "tls_key", "root"):
                if key in flat and flat[key] is not None and not Path(flat[key]).is_absolute():
                    flat[key] = base / flat[key]
        for key in ("app", "state_dir", "app_root"):
            if key not in flat:
                raise ConfigError(f"missing required setting {key!r}")
        flat.setdefault("trusted_keys", ())
        try:
            return cls(**flat)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(_invalid_setting(e)) from e

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> UpdaterConfig:
        """Read ``agent.toml``; ``overrides`` (None values ignored) win over the file.

        Raises :class:`ConfigError`.
        """
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from e
        try:
            return cls.from_mapping(data, base=path.resolve().parent, **overrides)
        except ConfigError as e:
            # Name the file when the setting came from it, not from a flag.
            named = str(e).split(" ", 1)[0].strip("':")
            if named in data and overrides.get(named) is None:
                raise ConfigError(f"{path}: {e}") from e.__cause__
            raise

    def evolve(self, **changes: Any) -> UpdaterConfig:
        return attrs.evolve(self, **changes)


__all__ = ["CHANNELS", "ConfigError", "UpdaterConfig", "server_address", "server_list"]
