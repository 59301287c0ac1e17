"""fleetpush.server: the releaser.

A long-running trio service that devices keep a connection to and operators
connect to with the operator role (specs/PROTOCOL.md §5, §7). Start it with
``await serve(config, task_status=...)`` or ``fleetpush server``; publish
releases with :func:`publish_release` (works while a server runs on the same
data dir).

Layers, each importing only those below it: ``app`` (listener, admission,
drain) -> ``session`` (one connection: handshake, role gate, the dispatch
table, push delivery) -> ``device_api``/``operator_api`` (handlers taking
``(services, call, params)``) -> ``services``/``call``/``fleet`` (shared
state, the caller, live device links) -> ``publish``, ``releases``,
``registry``, ``events``, ``chunks``, ``db``, ``config``, ``errors``.
"""

from .app import Server, ServerHandle, open_listeners, serve
from .config import ServerConfig
from .errors import (
    ChunkUnavailable,
    ConfigError,
    Conflict,
    IllegalTransition,
    NotFound,
    PublishError,
    ServerError,
)
from .publish import build_manifest, publish_release
from .releases import LIFECYCLE, ReleaseRecord, ReleaseStore
from .services import Services

__all__ = [
    "LIFECYCLE",
    "ChunkUnavailable",
    "ConfigError",
    "Conflict",
    "IllegalTransition",
    "NotFound",
    "PublishError",
    "ReleaseRecord",
    "ReleaseStore",
    "Server",
    "ServerConfig",
    "ServerError",
    "ServerHandle",
    "Services",
    "build_manifest",
    "open_listeners",
    "publish_release",
    "serve",
]
