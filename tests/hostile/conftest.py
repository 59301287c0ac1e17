"""Fixtures for the hostile suite: network namespaces (root only)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import netns
import pytest


def _remove_stale_namespaces() -> None:
    """Delete fph-* namespaces left by a killed earlier run of this suite (dead pid only)."""
    try:
        names = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return
    for name in names:
        if not name.startswith("fph-") or name.startswith("fph-probe"):
            continue
        pid = name.split("-")[1].split("x")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.fixture
def netns_pair() -> Iterator[netns.NetnsPair]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    _remove_stale_namespaces()
    with netns.NetnsPair() as pair:
        yield pair
