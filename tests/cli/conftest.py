"""Fixtures for the CLI tests: the real `fleetpush` entry point, a real releaser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import Releaser, run_cli
from fp_backend import database_args


@pytest.fixture
def releaser(tmp_path: Path) -> Iterator[Releaser]:
    """A `fleetpush server` subprocess on 127.0.0.1 (port 0) and a console config for it.

    It serves TLS, its default; the console config pins the certificate it printed.
    """
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
            insecure=False,
            release_keys=[rel.out.strip()],
            extra=database_args(),
        )
        assert child.tls_pin is not None
        config = tmp_path / "console.toml"
        config.write_text(
            f'server = "{host}:{port}"\n'
            f'tls_pin = "{child.tls_pin}"\n'
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
            tls_pin=child.tls_pin,
        )


@pytest.fixture
def plain_releaser(tmp_path: Path) -> Iterator[Releaser]:
    """A `fleetpush server` subprocess on plain TCP (devices that dial without TLS)."""
    from fleetpush.demo.processes import Children

    keys = tmp_path / "keys"
    keys.mkdir()
    op = run_cli("keygen", "--out", str(keys / "operator.key"))
    assert op.code == 0, op
    with Children(tmp_path / "logs") as children:
        child, host, port = children.start_server(
            tmp_path / "data",
            operator_keys=[op.out.strip()],
            insecure=True,
            extra=database_args(),
        )
        config = tmp_path / "console.toml"
        config.write_text(
            f'server = "{host}:{port}"\n'
            'operator_key = "keys/operator.key"\n'
            'operator_name = "tester"\n'
            "insecure = true\n"
        )
        yield Releaser(
            address=f"{host}:{port}",
            data_dir=tmp_path / "data",
            config=config,
            operator_key=keys / "operator.key",
            release_key=keys / "operator.key",
            release_pub="",
            pid=child.pid,
        )
