"""``fleetpush bench --compare``: rsync and nginx->curl+sha256 on the same files, same rounds.

Both tools run only when installed (``shutil.which``); otherwise their
figures are absent and the document says why under ``compare_skipped``.

- **rsync**: an ``rsync --daemon`` on 127.0.0.1 serves the release folder;
  each transfer pulls it with ``rsync -a --stats`` into a *fresh* folder and
  then runs ``sync -f`` on the received file (the device fsyncs what it
  installs, so rsync must too). ``--stats`` also gives the bytes rsync
  received, for the delta comparison (bench/delta.py).
- **http**: nginx serves the same folder; ``curl | tee FILE | sha256sum``
  then ``sync -f FILE``: download, verify a digest and persist, the way a
  plain HTTP updater would.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import attrs

from fleetpush.demo.processes import Child, Children, wait_for

from .baseline import BenchError

_RECEIVED = re.compile(r"Total bytes received: ([\d,.]+)")


def missing_tools() -> dict[str, str]:
    """``{"rsync": why, "http": why}`` for each comparison that cannot run here."""
    out = {}
    if not (shutil.which("rsync") and shutil.which("sync")):
        out["rsync"] = "rsync is not installed"
    if not (shutil.which("nginx") and shutil.which("curl") and shutil.which("sha256sum")):
        out["http"] = "nginx, curl or sha256sum is not installed"
    return out


def free_port() -> int:
    # The tools pick no port 0 themselves; a port just freed is good enough here.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, child: Child, what: str) -> None:
    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    if not wait_for(lambda: up() or not child.alive(), 10.0) or not child.alive():
        raise BenchError(f"{what} did not start:\n{child.log_tail()}")


@attrs.define
class Transfer:
    seconds: float
    #: bytes the tool says it received (rsync --stats); 0 if it does not say
    received: int = 0


class Rsync:
    """An rsync daemon on 127.0.0.1 serving the bench's workspace ``root`` as module ``ws``."""

    def __init__(self, children: Children, root: Path) -> None:
        self.port = free_port()
        self.root = root
        conf = root / "rsyncd.conf"
        conf.write_text(
            f"use chroot = false\nuid = {os.getuid()}\ngid = {os.getgid()}\n"
            f"[ws]\n  path = {root}\n  read only = true\n"
        )
        self.child = children.start(
            "rsyncd",
            [
                "rsync",
                "--daemon",
                "--no-detach",
                f"--config={conf}",
                "--address=127.0.0.1",
                f"--port={self.port}",
            ],
        )
        _wait_port(self.port, self.child, "rsync --daemon")

    def pull(self, folder: Path, dest: Path, *, delta: bool = False) -> Transfer:
        """``rsync -a --stats`` ``folder`` (in the workspace) into ``dest``, then ``sync -f``.

        ``delta``: ``--ignore-times``, so a changed file of the same size and
        mtime second is still compared (rsync's quick check would skip it).
        Raises :class:`BenchError`."""
        dest.mkdir(parents=True, exist_ok=True)
        rel = folder.relative_to(self.root)
        start = time.perf_counter()
        flags = ["-a", "--stats", *(["--ignore-times"] if delta else [])]
        out = _run(["rsync", *flags, f"rsync://127.0.0.1:{self.port}/ws/{rel}/", f"{dest}/"])
        files = [p for p in dest.rglob("*") if p.is_file()]
        if files:
            _run(["sync", "-f", *map(str, files)])
        seconds = time.perf_counter() - start
        m = _RECEIVED.search(out)
        received = int(m.group(1).replace(",", "").split(".")[0]) if m else 0
        return Transfer(seconds, received)


class Http:
    """nginx serving ``folder`` on 127.0.0.1."""

    def __init__(self, children: Children, root: Path, folder: Path) -> None:
        self.port = free_port()
        prefix = root / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""  # the workspace is mode 0700
        conf.write_text(
            f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n"
            "events { worker_connections 64; }\n"
            "http {\n  access_log off;\n  sendfile on;\n"
            f"  client_body_temp_path {prefix}/tmp;\n  proxy_temp_path {prefix}/tmp;\n"
            f"  fastcgi_temp_path {prefix}/tmp;\n  uwsgi_temp_path {prefix}/tmp;\n"
            f"  scgi_temp_path {prefix}/tmp;\n"
            f"  server {{ listen 127.0.0.1:{self.port}; root {folder}; }}\n}}\n"
        )
        self.child = children.start(
            "nginx", ["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
        )
        _wait_port(self.port, self.child, "nginx")

    def fetch(self, name: str, dest: Path, size: int) -> Transfer:
        """``curl | tee | sha256sum`` one file into ``dest``, then ``sync -f``.

        Raises :class:`BenchError` (also when the file is not ``size`` bytes:
        ``sh`` has no pipefail, so a failed curl shows as a short file)."""
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(name).name
        start = time.perf_counter()
        _run(
            [
                "sh",
                "-c",
                'set -e; curl -sSf "$1" | tee "$2" | sha256sum >/dev/null; sync -f "$2"',
                "sh",
                f"http://127.0.0.1:{self.port}/{name}",
                str(target),
            ]
        )
        seconds = time.perf_counter() - start
        got = target.stat().st_size if target.exists() else 0
        if got != size:
            raise BenchError(f"http: curl got {got} of {size} bytes of {name}")
        return Transfer(seconds)


def _run(argv: list[str], timeout: float = 3600.0) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"{argv[0]} failed: {e}") from e
    if r.returncode != 0:
        raise BenchError(f"{' '.join(argv[:2])} exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return r.stdout
