"""`fleetpush demo` end to end: real releaser, real agents, the apps asked themselves."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from cli_helpers import FLEETPUSH

pytestmark = pytest.mark.demo

ANSWER = re.compile(r"(device-\d+)\s+app itself answers: demo-sensor version (\S+) pid (\d+)")


def _section(out: str, start: str, end: str) -> str:
    return out[out.index(start) : out.index(end)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not running: it only waits to be reaped by its parent
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_demo_updates_then_rolls_back(tmp_path: Path) -> None:
    keep = tmp_path / "ws"
    proc = subprocess.run(
        [FLEETPUSH, "demo", "--devices", "3", "--keep", str(keep)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "demo passed" in out

    # the apps themselves, asked over their own port, after the update ...
    updated = ANSWER.findall(_section(out, "== 3.", "== 4."))
    assert sorted(d for d, v, _ in updated) == ["device-1", "device-2", "device-3"]
    assert {v for _, v, _ in updated} == {"1.1.0"}
    # ... and after the broken 1.2.0 was rolled back, in new processes
    rolled = ANSWER.findall(_section(out, "== 4.", "== 5."))
    assert sorted(d for d, v, _ in rolled) == ["device-1", "device-2", "device-3"]
    assert {v for _, v, _ in rolled} == {"1.1.0"}
    assert {p for _, _, p in rolled}.isdisjoint({p for _, _, p in updated})
    section4 = _section(out, "== 4.", "== 5.")
    assert section4.count("ROLLED BACK") >= 3
    # Each step once per device (a step sent live and again as a durable outcome
    # was shown twice), in words true of agent devices (they do not re-exec).
    section3 = _section(out, "== 3.", "== 4.")
    for d in ("device-1", "device-2", "device-3"):
        assert section3.count(f"{d}  staged 1.1.0") == 1, section3
        assert section3.count(f"{d}  new version on trial 1.1.0") == 1, section3
        assert section3.count(f"{d}  committed 1.1.0") == 1, section3
        assert section4.count(f"{d}  ROLLED BACK to 1.1.0") == 1, section4
        # issue 12: the release adds a dependency; its env is built before the
        # app stops, and the app itself answers with it in both sections.
        steps = [
            f"{d}  preparing the release's Python environment (offline) 1.1.0",
            f"{d}  stopping the app 1.1.0",
            f"{d}  backing up code and data 1.1.0",
            f"{d}  installing the new files 1.1.0",
            f"{d}  starting the app 1.1.0",
            f"{d}  committed 1.1.0",
        ]
        at = [section3.index(step) for step in steps]
        assert at == sorted(at), section3
    assert "with a Python env: + demo_units 1.0" in section3
    assert section3.count("deps demo_units 1.0") == 3 and section4.count("deps demo_units 1.0") == 3
    # ... and after root v2 rotated the release key, 1.3.0 under the new key, with
    # no device touched (issue 17): the old key refused, every app answering 1.3.0.
    section5 = _section(out, "== 5.", "== 6.")
    assert "the old release key is refused now" in section5, section5
    rotated = ANSWER.findall(section5)
    assert sorted(d for d, _, _ in rotated) == ["device-1", "device-2", "device-3"]
    assert {v for _, v, _ in rotated} == {"1.3.0"}
    assert "re-exec" not in out, out
    assert "exited with code 3" in section4  # the failure reached the operator

    # every process the demo started is gone
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]
    pids += [int(p) for _, _, p in updated + rolled + rotated]
    assert pids and not [p for p in pids if _alive(p)]

    # --keep leaves a workspace to explore
    assert (keep / "console.toml").exists()
    assert (keep / "logs").is_dir()
    assert "fleetpush devices --config" in out
