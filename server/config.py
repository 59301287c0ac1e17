"""The releaser's configuration: one frozen attrs class, loadable from TOML.

Every field can be set in ``server.toml`` under the same name (plus ``listen =
"HOST:PORT"`` as a shorthand for ``host``/``port``); the CLI's flags override
the file. Keys are given as hex in TOML and held as raw 32-byte Ed25519 public
keys in memory. A relative ``data_dir`` in a TOML file is taken relative to
that file's directory.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Final

import attrs
from attrs import field, frozen
from attrs.validators import ge, gt, in_, instance_of, optional
from fleetpush.protocol.durations import DurationError, parse_duration
from fleetpush.protocol.keys import KeyFormatError, public_key_from_bytes, public_key_from_hex

from fleetpush.net.dial import DEFAULT_PORT, AddressError, parse_address

from .errors import ConfigError

DEFAULT_HOST: Final = "127.0.0.1"
ENROLLMENT_POLICIES: Final = ("auto", "manual")


def _keys(value: object) -> list[bytes]:
    """Accept raw 32-byte keys or hex strings; return raw keys."""
    if value is None:
        return []
    if isinstance(value, str | bytes):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ConfigError(f"expected a list of public keys, got {type(value).__name__}")
    out: list[bytes] = []
    for item in value:
        try:
            if isinstance(item, str):
                out.append(public_key_from_hex(item))
            elif isinstance(item, bytes):
                public_key_from_bytes(item)
                out.append(item)
            else:
                raise ConfigError(f"a public key must be hex text, got {type(item).__name__}")
        except KeyFormatError as e:
            raise ConfigError(str(e)) from e
    return out


def parse_listen(text: str) -> tuple[str, int]:
    """The ``listen`` setting (and ``--listen``): ``HOST:PORT``, ``[V6]:PORT`` or ``HOST``.

    The one address grammar (:func:`fleetpush.net.dial.parse_address`); port 0
    picks a free port. Raises :class:`ConfigError`.
    """
    try:
        return parse_address(text, listen=True)
    except AddressError as e:
        raise ConfigError(f"listen: {e}") from e


def _duration(value: object) -> float:
    try:
        return parse_duration(value)  # type: ignore[arg-type]
    except DurationError as e:
        raise ConfigError(str(e)) from e


@frozen(kw_only=True)
class ServerConfig:
    """Everything the releaser needs. Only ``data_dir`` is required."""

    data_dir: Path = field(converter=Path)
    #: None: the SQLite file in the data dir; a ``postgresql://`` URL: that
    #: PostgreSQL database (issue 15; needs the ``postgres`` extra).
    database: str | None = field(default=None)
    #: PostgreSQL connections the releaser's database calls run on, each in a
    #: worker thread off the trio thread (server/db_calls.py); 0 runs them on
    #: the trio thread, on one connection. Unused with SQLite.
    database_pool: int = field(default=8, validator=ge(0))
    host: str = DEFAULT_HOST
    #: 0 picks a free port; the real one is on the handle serve() starts.
    port: int = field(default=DEFAULT_PORT, validator=[ge(0)])
    #: None: generated once and persisted in the data dir.
    server_id: str | None = None
    enrollment: str = field(default="auto", validator=in_(ENROLLMENT_POLICIES))
    operator_keys: list[bytes] = field(factory=list, converter=_keys)
    #: release keys the server checks published manifests against (empty: no check).
    release_keys: list[bytes] = field(factory=list, converter=_keys)
    release_threshold: int = field(default=1, validator=ge(1))
    #: authenticated connections (devices and operators) at once.
    max_connections: int = field(default=2000, validator=ge(1))
    #: connections still in their handshake at once, and from one source
    #: address; they do not count against max_connections (issue 10, item 7).
    max_handshaking: int = field(default=256, validator=ge(1))
    max_handshaking_per_source: int = field(default=16, validator=ge(1))
    #: the handshake deadline once more than half of max_handshaking is in use.
    busy_handshake_timeout: float = field(default=2.0, validator=gt(0))
    heartbeat: float = field(default=15.0, validator=gt(0))
    handshake_timeout: float = field(default=10.0, validator=gt(0))
    frame_timeout: float = field(default=30.0, validator=gt(0))
    send_timeout: float = field(default=30.0, validator=gt(0))
    #: how long a graceful stop waits for chunk streams in flight.
    grace_period: float = field(default=10.0, validator=ge(0))
    #: verified chunks kept in memory, shared by every download (bytes). The
    #: default keeps a releaser with 1000 connected devices (about 25 KiB of
    #: session state each) under 150 MB while it serves a large release.
    chunk_cache_bytes: int = field(default=48 * 1024 * 1024, validator=ge(0))
    #: a session whose chunk send has been blocked this long is closed when
    #: other downloads wait for room in the cache (issue 10, item 5).
    chunk_stall_timeout: float = field(default=5.0, validator=gt(0))
    #: disk reads of chunks running at once in worker threads.
    max_disk_reads: int = field(default=4, validator=ge(1))
    #: bytes/s the background scrub reads to check the store against its
    #: manifests (scrub.py: chunks are served without re-hashing); 0: no scrub.
    scrub_rate: int = field(default=8 * 1024 * 1024, validator=ge(0))
    #: time from the end of one scrub pass to the next (seconds, or "6h" in server.toml).
    scrub_interval: float = field(default=6 * 3600.0, converter=_duration, validator=gt(0))
    #: events queued per watching operator before new ones are dropped.
    watch_queue: int = field(default=1000, validator=ge(1))
    #: bytes of events queued per watching operator (issue 10, item 6).
    watch_queue_bytes: int = field(default=4 * 1024 * 1024, validator=ge(64 * 1024))
    #: events kept in the database history (older ones are pruned). The
    #: history is the audit trail (``fleetpush events``): a million rows is
    #: about 300 MB and a few rollouts of a 10,000-device fleet.
    history_limit: int = field(default=1_000_000, validator=ge(100))
    #: events older than this are pruned too (seconds, or "90d" in server.toml); 0: never.
    event_retention: float = field(default=90 * 86400.0, converter=_duration)
    #: PEM certificate and key: when set, every connection is TLS (src/fleetpush/tls.py).
    tls_cert: Path | None = field(default=None, validator=optional(instance_of(Path)))
    tls_key: Path | None = field(default=None, validator=optional(instance_of(Path)))
    #: CA of device certificates: when set, TLS is mutual and a device's
    #: certificate must name the device id it claims in hello.
    tls_client_ca: Path | None = field(default=None, validator=optional(instance_of(Path)))
    #: ``HOST:PORT`` to serve Prometheus metrics on (metrics.py); None: not served.
    #: TLS with the releaser's certificate when the releaser uses TLS.
    metrics: str | None = field(default=None, validator=optional(instance_of(str)))
    #: seconds between two copies of the fleet figures into the metrics' gauges.
    metrics_interval: float = field(default=5.0, validator=gt(0))
    #: ``HOST:PORT`` to serve the operator web dashboard on (server/web/); None:
    #: not served. TLS with the releaser's certificate when the releaser uses TLS.
    http: str | None = field(default=None, validator=optional(instance_of(str)))
    #: the online timestamp key (PEM) signing freshness statements (freshness.py,
    #: specs/PROTOCOL.md §8.6); its public key is in the root's timestamp role.
    timestamp_key: Path | None = field(default=None, converter=attrs.converters.optional(Path))
    #: how long a freshness statement is valid: a device that gets no newer one
    #: within this reports ``stale`` (seconds, or "1h" in server.toml).
    freshness_expiry: float = field(default=3600.0, converter=_duration, validator=gt(0))
    #: the object store releases may be published to (``s3://bucket/prefix``,
    #: artifacts.py, issue 15); None: the data dir only. Endpoint, region and
    #: credentials: the ``store_*`` settings, else the standard ``AWS_*`` variables.
    store: str | None = field(default=None, validator=optional(instance_of(str)))
    store_endpoint: str | None = field(default=None, validator=optional(instance_of(str)))
    store_region: str | None = field(default=None, validator=optional(instance_of(str)))
    #: one object store request, connect included (seconds): the longest a
    #: cache miss waits per attempt before its chunks are refused.
    store_timeout: float = field(default=30.0, converter=_duration, validator=gt(0))
    #: object store reads running at once in worker threads (apart from max_disk_reads).
    max_store_reads: int = field(default=16, validator=ge(1))

    @metrics.validator
    @http.validator
    def _check_listen_address(self, attr: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None:
            try:
                parse_address(value, listen=True)
            except AddressError as e:
                raise ConfigError(f"{attr.name}: {e}") from e

    @database.validator
    def _check_database(self, _attr: object, value: str | None) -> None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"database: {value!r} is not a postgresql:// URL")

    @store.validator
    def _check_store(self, _attr: object, value: str | None) -> None:
        if value is not None and not value.startswith("s3://"):
            raise ConfigError(f"store: {value!r} is not an object store URL [use s3://bucket/prefix]")

    @release_threshold.validator
    def _check_threshold(self, _attr: object, value: int) -> None:
        if self.release_keys and value > len(self.release_keys):
            raise ConfigError(
                f"release threshold {value} exceeds the {len(self.release_keys)} release keys"
            )

    @classmethod
    def from_toml(
        cls, path: str | Path, *, ignore: tuple[str, ...] = (), **overrides: Any
    ) -> ServerConfig:
        """Load ``path`` and apply ``overrides`` (None values are ignored).

        ``ignore`` names settings that are not the library's but its caller's
        (``fleetpush server`` reads ``insecure`` and ``tls_names`` itself).
        Raises :class:`ConfigError` for unreadable files, unknown keys and bad values.
        """
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        table = raw.get("server", raw)  # a [server] table or top-level keys
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [server] must be a table")
        values = {k: v for k, v in table.items() if k not in ignore}
        if "data_dir" in values:
            data_dir = Path(str(values["data_dir"])).expanduser()
            values["data_dir"] = data_dir if data_dir.is_absolute() else path.parent / data_dir
        for name in ("tls_cert", "tls_key", "tls_client_ca", "timestamp_key"):
            if values.get(name) is not None:
                values[name] = path.parent / Path(str(values[name])).expanduser()
        if "listen" in values:  # split first, so host/port overrides win over the file
            values["host"], values["port"] = parse_listen(str(values.pop("listen")))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(values, where=str(path))

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, where: str = "config") -> ServerConfig:
        """Build from plain values (TOML types); ``listen`` splits into host/port."""
        values = dict(values)
        listen = values.pop("listen", None)
        if listen is not None:
            values["host"], values["port"] = parse_listen(str(listen))
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s): {', '.join(unknown)}")
        if "data_dir" not in values:
            raise ConfigError(f"{where}: data_dir is required")
        try:
            return cls(**values)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from e
