"""fleetpush.server: the releaser.

A long-running trio service that devices keep a connection to and operators
connect to with the operator role (specs/PROTOCOL.md §5, §7). Start it with
``await serve(config, task_status=...)`` or ``fleetpush server``; publish
releases with :func:`publish_release` (works while a server runs on the same
data dir).
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
from .releases import (
    LIFECYCLE,
    ReleaseRecord,
    ReleaseStore,
    build_manifest,
    publish_release,
)

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
    "build_manifest",
    "open_listeners",
    "publish_release",
    "serve",
]
