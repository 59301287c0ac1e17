"""Run a command with its releaser state in a throwaway PostgreSQL (issue 15).

Starts a private cluster (tests/support/fp_pg.py: Debian's initdb/pg_ctl on a
free 127.0.0.1 port), makes an empty database, runs COMMAND with
``FLEETPUSH_DATABASE`` naming it (every ``fleetpush`` process that opens a
data dir then uses it: the releaser, ``release publish``, benches), and stops
and deletes the cluster afterwards. Exits with COMMAND's exit code.

    python scripts/with_postgres.py -- python tests/server/bench_server_push.py --devices 1000
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from fp_pg import fresh_database, running_cluster


def main(argv: list[str]) -> int:
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        print(__doc__, file=sys.stderr)
        return 2
    with running_cluster() as cluster, fresh_database(cluster) as url:
        env = {**os.environ, "FLEETPUSH_DATABASE": url}
        return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
