"""A real releaser (``fleetpush.server.serve``) in a nursery, and releases published to it.

One copy of the helpers the client, server and hostile suites each had: start
a releaser on 127.0.0.1 port 0 and always shut it down, publish a source tree
into its data directory, approve and push as the operator.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol.keys import public_bytes
from fleetpush.server import ServerConfig, ServerHandle, publish_release, serve
from fleetpush.server.releases import ReleaseStore
from fp_backend import database, database_args
from fp_keys import OPERATOR_KEY, RELEASE_KEY

from fleetpush.operator import connect as operator_connect


@asynccontextmanager
async def running_releaser(config: ServerConfig) -> AsyncIterator[ServerHandle]:
    """Serve ``config`` until the block ends, then stop gracefully (within 10 s).

    Raises what ``serve`` raises before it listens (ConfigError, DatabaseError).
    """
    async with trio.open_nursery() as nursery:
        handle: ServerHandle = await nursery.start(serve, config)
        try:
            yield handle
        finally:
            with trio.fail_after(10):
                await handle.shutdown()


def releaser_config(
    data_dir: Path, *, operators: Iterable[Ed25519PrivateKey] = (OPERATOR_KEY,), **kw: Any
) -> ServerConfig:
    """A releaser on 127.0.0.1, port 0, that accepts ``operators``; ``kw`` are ServerConfig's.

    The grace period is 1 s (not the production default): a test's shutdown
    should not wait for connections it has already finished with.
    """
    settings: dict[str, Any] = dict(
        data_dir=data_dir,
        port=0,
        operator_keys=[public_bytes(k) for k in operators],
        grace_period=1.0,
        database=database(),  # the test's storage backend (fp_backend.py)
    )
    settings.update(kw)
    return ServerConfig(**settings)


def releaser(data_dir: Path, **kw: Any) -> AbstractAsyncContextManager[ServerHandle]:
    """:func:`running_releaser` of :func:`releaser_config` (same arguments)."""
    return running_releaser(releaser_config(data_dir, **kw))


def publish(
    data_dir: Path,
    src: Path,
    version: str,
    *,
    app: str = "demo",
    keys: Sequence[Ed25519PrivateKey] = (RELEASE_KEY,),
    approved: bool = False,
    **kw: Any,
) -> Any:
    """Publish the files under ``src``; ``kw`` are publish_release's (chunk_size, notes...).

    A draft, or with ``approved`` approved straight in the store (for a
    releaser that is not running yet; a running one learns through
    :func:`approve`). Returns publish_release's result; raises what it raises.
    """
    result = publish_release(data_dir, src, app=app, version=version, signing_keys=list(keys), **kw)
    if approved:
        approve_in_store(data_dir, version, app=app)
    return result


def approve_in_store(data_dir: Path, version: str, *, app: str = "demo") -> None:
    """Approve a draft in the store (draft -> pre-released -> approved), no releaser needed."""
    store = ReleaseStore.open(data_dir)
    try:
        store.set_status(app, version, "pre-released", "test")
        store.set_status(app, version, "approved", "test")
    finally:
        store.close()


async def approve(
    handle: ServerHandle, version: str, *, app: str = "demo", key: Ed25519PrivateKey = OPERATOR_KEY
) -> None:
    """Approve a release through the running releaser, as the operator console does."""
    async with operator_connect(("127.0.0.1", handle.port), key, name="ops") as op:
        await op.approve(app, version)


async def publish_and_approve(
    handle: ServerHandle, data_dir: Path, src: Path, version: str, *, app: str = "demo", **kw: Any
) -> None:
    """:func:`publish` into the running releaser's ``data_dir``, then :func:`approve`."""
    publish(data_dir, src, version, app=app, **kw)
    await approve(handle, version, app=app)


async def push(
    handle: ServerHandle,
    version: str,
    mode: str = "force",
    restart: bool = True,
    *,
    app: str = "demo",
    devices: Sequence[str] = ("dev-1",),
    key: Ed25519PrivateKey = OPERATOR_KEY,
) -> None:
    """Push ``version`` to ``devices`` through the running releaser."""
    async with operator_connect(("127.0.0.1", handle.port), key, name="ops") as op:
        await op.push(app=app, version=version, mode=mode, restart=restart, devices=list(devices))


def start_releaser_process(*args: str) -> tuple[subprocess.Popen[str], int]:
    """A real ``fleetpush server ARGS...`` process; returns it and the port it listens on.

    ``args`` must include ``--listen 127.0.0.1:0``; the port is read from its
    ``listening on HOST:PORT`` line. Raises RuntimeError if it never says it.
    """
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "fleetpush.cli.main", "server", *args, *database_args()],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(100):
        line = proc.stdout.readline()
        if line.startswith("listening on"):
            return proc, int(line.rsplit(":", 1)[1])
        if not line:
            break
    proc.kill()
    proc.wait(10)
    proc.stdout.close()
    raise RuntimeError("releaser did not start")
