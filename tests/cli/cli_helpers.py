"""Helpers of the CLI tests (a unique module name: conftest is not importable by name)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
import trio
from fleetpush.protocol import PROTOCOL_VERSION
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Hello
from fp_keys import fixed_key

from fleetpush.net.dial import Dialed, dial

FLEETPUSH = str(Path(sys.executable).with_name("fleetpush"))


@attrs.frozen
class Result:
    code: int
    out: str
    err: str


def run_cli(
    *args: str, timeout: float = 60.0, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Result:
    """Run the installed `fleetpush` script in a subprocess (``env``: its whole environment)."""
    proc = subprocess.run(
        [FLEETPUSH, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@attrs.frozen
class Releaser:
    address: str
    data_dir: Path
    config: Path  # console.toml with server, tls_pin, operator key, data dir, release key
    operator_key: Path
    release_key: Path
    release_pub: str
    pid: int
    #: the pin it printed and console.toml holds (TLS is the default); None over --insecure
    tls_pin: str | None = None


async def cli(r: Releaser, *args: str) -> Result:
    """`fleetpush ARGS --config <r's console.toml>`, off the trio thread."""
    return await trio.to_thread.run_sync(lambda: run_cli(*args, "--config", str(r.config)))


@asynccontextmanager
async def devices(
    r: Releaser, count: int, prefix: str, app: str = "sensor"
) -> AsyncIterator[list[Dialed]]:
    """``count`` device sessions (``<prefix>-00``...) of ``app`` over the real
    handshake on plain TCP, held open until the block ends."""
    host, port = r.address.split(":")
    async with AsyncExitStack() as stack:
        links = []
        for i in range(count):
            key = fixed_key(f"{prefix}{i}")
            hello = Hello(
                protocol_version=PROTOCOL_VERSION,
                role="device",
                peer_id=f"{prefix}-{i:02d}",
                public_key=public_bytes(key),
                app=app,
                version="1.0.0",
                channel="stable",
            )
            links.append(
                await stack.enter_async_context(dial((host, int(port)), key, hello, timeout=20))
            )
        yield links
