"""Fixtures of the releaser's tests: a data directory, keys, a fast ServerConfig.

The helpers the tests import (a running releaser, a protocol-only test device,
publish...) are in server_helpers.py, a uniquely named module: tests import
them with ``from server_helpers import ...``, never from a conftest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol.keys import public_bytes
from fleetpush.server import ServerConfig
from fp_backend import database
from server_helpers import FAST


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def operator_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def release_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def config(data_dir: Path, operator_key: Ed25519PrivateKey) -> ServerConfig:
    return ServerConfig(
        data_dir=data_dir,
        port=0,
        operator_keys=[public_bytes(operator_key)],
        database=database(),  # the test's storage backend (fp_backend.py)
        **FAST,
    )
