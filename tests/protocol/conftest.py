"""Fixtures for the protocol tests; the helpers live in protocol_helpers.py."""

from __future__ import annotations

import pytest
from protocol_helpers import ConnectionPair


@pytest.fixture
def pair() -> ConnectionPair:
    """A fresh client/server pair, before the handshake."""
    return ConnectionPair()


@pytest.fixture
def open_pair() -> ConnectionPair:
    """A client/server pair whose handshake has completed (both OPEN)."""
    return ConnectionPair().handshake()
