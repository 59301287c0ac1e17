"""Hostile peers against a real releaser process while 50 honest devices download.

See hostile_peers.py for the attacks. The honest devices must download the
release over and over with every chunk and file verified, the releaser must
survive and drop each attacker, and the honest throughput is printed with and
without the attack (the figures in specs/THREATS.md come from the script).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_peers import run


@pytest.mark.slow
def test_50_honest_devices_keep_downloading_under_attack(tmp_path: Path) -> None:
    out = run(tmp_path, devices=50, seconds=6.0, size=4 * 1024 * 1024)
    quiet, loud = out["without_attack"], out["with_attack"]
    print(
        f"\nhonest throughput: {quiet['honest_bps'] / 1e6:.1f} MB/s without attack, "
        f"{loud['honest_bps'] / 1e6:.1f} MB/s with; outcomes {loud['outcomes']}"
    )
    assert out["releaser_survived"]
    for phase in (quiet, loud):
        assert phase["honest_errors"] == []
        assert phase["honest_downloads"] >= 50  # every device finished at least once on average
    # Every attack ran, and the releaser closed the connection or refused it each time.
    assert set(loud["attacks"]) == {
        "oversize", "bomb", "amplify", "drip", "non_reader", "flood", "over_limit",
    }  # fmt: skip
    outcomes = loud["outcomes"]
    assert not any(k.endswith("still open") for k in outcomes), outcomes
    for kind in ("oversize", "bomb", "amplify", "over_limit"):
        assert outcomes.get(f"{kind}:closed", 0) >= 1, (kind, outcomes)
    assert outcomes.get("drip:dropped", 0) + outcomes.get("drip:closed", 0) >= 1
    # Loose: the same two cores run 50 verifying clients, the attackers and the releaser.
    assert loud["honest_bps"] >= 0.3 * quiet["honest_bps"]
