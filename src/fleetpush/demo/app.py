"""Building the demo app's releases and asking a running app for its version."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from importlib import resources
from pathlib import Path
from typing import Any

from fleetpush.protocol import FleetpushError

APP = "demo-sensor"
ASSET_SIZE = 6 * 1024 * 1024


class AppQueryError(FleetpushError):
    """The running app did not answer its version."""


def app_source() -> str:
    return resources.files("fleetpush.demo").joinpath("example_app.py").read_text()


def build_release(dest: Path, version: str, *, broken: bool = False) -> Path:
    """Write release ``version`` of the demo app into ``dest`` (created fresh).

    ``app.py`` is the example app with its ``VERSION`` (and ``CRASH_ON_START``
    for a broken release) rewritten; ``model.bin`` is a few MiB of data that
    changes with every version, so the download has something to show.
    """
    source = app_source()
    source, n = re.subn(r'^VERSION = "[^"]*"', f'VERSION = "{version}"', source, flags=re.M)
    if n != 1:
        raise FleetpushError("example_app.py has no VERSION line to rewrite")
    if broken:
        source = re.sub(
            r"^CRASH_ON_START = False", "CRASH_ON_START = True", source, count=1, flags=re.M
        )
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / "app.py").write_text(source)
    (dest / "VERSION").write_text(version + "\n")
    seed = hashlib.sha256(f"demo-model-{version}".encode()).digest()
    block = hashlib.shake_256(seed).digest(1024 * 1024)
    with (dest / "model.bin").open("wb") as f:
        for i in range(ASSET_SIZE // len(block)):
            f.write(i.to_bytes(4, "little") + block[4:])
    return dest


def read_port(port_file: Path) -> tuple[int, int] | None:
    """(port, pid) the running app wrote, or None if it has not (yet)."""
    try:
        port, pid, _version = port_file.read_text().split()
        return int(port), int(pid)
    except (OSError, ValueError):
        return None


def ask_version(port_file: Path, timeout: float = 2.0) -> dict[str, Any]:
    """Ask the running app itself; returns its answer ``{"app", "version", "pid"}``.

    Raises :class:`AppQueryError` if it does not answer.
    """
    found = read_port(port_file)
    if found is None:
        raise AppQueryError(f"the app has not written {port_file}")
    port, _ = found
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"version\n")
            data = b""
            while not data.endswith(b"\n"):
                more = s.recv(4096)
                if not more:
                    break
                data += more
        answer: dict[str, Any] = json.loads(data)
    except (OSError, ValueError) as e:
        raise AppQueryError(f"the app on port {port} did not answer: {e}") from e
    return answer
