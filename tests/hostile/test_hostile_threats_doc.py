"""Every test that specs/THREATS.md cites exists (collected by pytest right now)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"`(tests/[\w/]+\.py)(::[^`]+)?`")


def test_every_cited_test_is_collected() -> None:
    text = (ROOT / "specs" / "THREATS.md").read_text()
    cited = CITED.findall(text)
    assert len(cited) > 40
    files = sorted({f for f, _ in cited})
    for f in files:
        assert (ROOT / f).is_file(), f"{f} does not exist"
    # -P: the repository root must not shadow the installed package (STYLE.md §7).
    argv = [sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    out = subprocess.run([*argv, *files], cwd=ROOT, capture_output=True, text=True, timeout=120)
    collected = {line.strip() for line in out.stdout.splitlines()}
    missing = []
    for f, node in cited:
        if not node:
            continue
        want = f + node
        # A name without parameters stands for all of its parametrizations.
        if want not in collected and not any(c.startswith(want + "[") for c in collected):
            missing.append(want)
    assert not missing, "cited in specs/THREATS.md but not collected:\n" + "\n".join(missing)
