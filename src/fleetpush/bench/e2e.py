"""End to end through the public interfaces: ``fleetpush release publish`` and
``fleetpush update`` as real processes against a real ``fleetpush server``.

- :func:`publish` runs ``fleetpush release publish`` (hashing, and chunking
  where the releaser has a ``--chunking`` option) and returns its wall time:
  the *indexing time at publish* of issue 14.
- :class:`Device` is one device folder (``agent.toml``, state dir, app
  root). :meth:`Device.update` runs ``fleetpush update --no-start --json``:
  from the request to the new version installed (the updater fsyncs what it
  installs before it reports it), and reads the process's own CPU time
  (utime+stime) and peak RSS (``ru_maxrss``, the kernel's VmHWM) from
  ``wait4``, the accounting /proc shows while it runs, taken at exit so
  nothing of it is missed.
- :func:`proc_cpu` reads a running process's utime+stime from
  ``/proc/PID/stat``: the releaser's CPU for one update is the difference
  around it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import attrs

from fleetpush.demo.processes import FLEETPUSH

from .baseline import BenchError

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime+stime of ``pid`` in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name (field 2) may hold spaces: split after its ')'
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def publish_options() -> set[str]:
    """The options ``fleetpush release publish --help`` lists (``--chunking``, ...)."""
    out = _cli(["release", "publish", "--help"], timeout=60).stdout
    return {w.rstrip(",") for w in out.split() if w.startswith("--")}


def publish(
    data_dir: Path,
    src: Path,
    *,
    app: str,
    version: str,
    key: Path,
    hash_algorithm: str = "sha256",
    chunking: str | None = None,
) -> float:
    """``fleetpush release publish`` as a process; its wall time. Raises BenchError."""
    argv = ["release", "publish", "--data-dir", str(data_dir), "--key", str(key)]
    argv += ["--app", app, "--version", version, "--hash", hash_algorithm, "--json"]
    if chunking is not None:
        argv += ["--chunking", chunking]
    start = time.perf_counter()
    r = _cli([*argv, str(src)], timeout=3600)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise BenchError(f"release publish {app} {version}: {r.stderr.strip()[-300:]}")
    return seconds


@attrs.frozen
class UpdateRun:
    seconds: float
    cpu_s: float
    peak_rss: int
    answer: dict[str, Any]


@attrs.define
class Device:
    """A device folder whose ``fleetpush update`` talks to ``server`` (HOST:PORT)."""

    root: Path
    server: str
    app: str
    release_key_hex: str
    device_id: str

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "agent.toml").write_text(
            f'server = "{self.server}"\n'
            "insecure = true\n"  # the bench measures the protocol; TLS has its own script
            f'app = "{self.app}"\n'
            f'device_id = "{self.device_id}"\n'
            'state_dir = "state"\n'
            'app_root = "app"\n'
            "auto_check = false\n"
            f'trusted_keys = ["{self.release_key_hex}"]\n'
            "check_timeout = 600.0\n"
        )

    def update(self, version: str, timeout: float = 3600.0) -> UpdateRun:
        """``fleetpush update --to VERSION --no-start --json``. Raises BenchError."""
        self.write_config()
        argv = [*FLEETPUSH, "update", "-c", "agent.toml", "--to", version, "--no-start", "--json"]
        out_path, err_path = self.root / "update.out", self.root / "update.err"
        start = time.perf_counter()
        try:
            with out_path.open("wb") as out, err_path.open("wb") as err:
                child = subprocess.Popen(
                    argv, cwd=self.root, stdin=subprocess.DEVNULL, stdout=out, stderr=err
                )
            usage, code = _wait4(child, timeout)
            seconds = time.perf_counter() - start
            text = out_path.read_text(errors="replace").strip()
            err_text = err_path.read_text(errors="replace").strip()
        except OSError as e:
            raise BenchError(f"fleetpush update {self.app} {version}: {e}") from e
        try:
            answer: dict[str, Any] = json.loads(text.splitlines()[-1])
        except (ValueError, IndexError):
            answer = {}
        if code != 0 or answer.get("installed") != version:
            raise BenchError(
                f"fleetpush update {self.app} {version} failed (exit {code}): "
                f"{(err_text or text)[-300:]}"
            )
        return UpdateRun(seconds, usage[0], usage[1], answer)


def _wait4(child: subprocess.Popen[bytes], timeout: float) -> tuple[tuple[float, int], int]:
    """Reap ``child`` with ``wait4``: ((utime+stime, peak RSS bytes), exit code).

    Raises :class:`BenchError` after ``timeout`` (the child is killed)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            child.kill()
            os.wait4(child.pid, 0)
            child.returncode = -9
            raise BenchError(f"fleetpush update took over {timeout:.0f}s")
        time.sleep(0.005)
    child.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux: the child's VmHWM at exit
    return (ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024), child.returncode


def _cli(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [*FLEETPUSH, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"fleetpush {' '.join(argv[:2])} failed: {e}") from e
