"""README's one command for the clustered mode starts what it says (scripts/cluster_local.py).

PostgreSQL, the local S3 server and two releasers: ``--check`` exits 0 once
both listen and one of them holds the leader lock. The fixtures are asked
for only so that a machine without PostgreSQL or moto skips as the rest of
the suite does; the script starts its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cluster_local.py"


async def test_the_local_cluster_starts_two_releasers_and_a_leader(
    tmp_path: Path, pg_cluster: object, s3_server: str
) -> None:
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, str(SCRIPT), "--dir", str(tmp_path), "--check"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert out.startswith("releaser A: 127.0.0.1:") and "leader: fleetpush-bus " in out, out
