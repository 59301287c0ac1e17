"""Helpers of the CLI tests (a unique module name: conftest is not importable by name)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs

FLEETPUSH = str(Path(sys.executable).with_name("fleetpush"))


@attrs.frozen
class Result:
    code: int
    out: str
    err: str


def run_cli(*args: str, timeout: float = 60.0, cwd: Path | None = None) -> Result:
    """Run the installed `fleetpush` script in a subprocess."""
    proc = subprocess.run(
        [FLEETPUSH, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
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
