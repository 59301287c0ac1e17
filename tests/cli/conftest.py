"""Fixtures for the CLI tests: the real `fleetpush` entry point, a real releaser."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

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
    config: Path  # console.toml with server, operator key, data dir, release key
    operator_key: Path
    release_key: Path
    release_pub: str
    pid: int


@pytest.fixture
def cli() -> object:
    return run_cli


@pytest.fixture
def releaser(tmp_path: Path) -> Iterator[Releaser]:
    """A `fleetpush server` subprocess on 127.0.0.1 (port 0) and a console config for it."""
    from fleetpush.demo.processes import Children

    keys = tmp_path / "keys"
    keys.mkdir()
    op = run_cli("keygen", "--out", str(keys / "operator.key"))
    rel = run_cli("keygen", "--out", str(keys / "release.key"))
    assert op.code == 0 and rel.code == 0, (op, rel)
    with Children(tmp_path / "logs") as children:
        child, host, port = children.start_server(
            tmp_path / "data",
            operator_keys=[op.out.strip()],
            release_keys=[rel.out.strip()],
        )
        config = tmp_path / "console.toml"
        config.write_text(
            f'server = "{host}:{port}"\n'
            'operator_key = "keys/operator.key"\n'
            'operator_name = "tester"\n'
            'data_dir = "data"\n'
            'release_keys = ["keys/release.key"]\n'
        )
        yield Releaser(
            address=f"{host}:{port}",
            data_dir=tmp_path / "data",
            config=config,
            operator_key=keys / "operator.key",
            release_key=keys / "release.key",
            release_pub=rel.out.strip(),
            pid=child.pid,
        )
