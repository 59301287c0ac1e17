"""Try the clustered mode on one machine: PostgreSQL, a local S3 server, two releasers.

Starts a private PostgreSQL (Debian's initdb/pg_ctl, tests/support/fp_pg.py),
moto's S3-API server with one bucket (tests/support/fp_s3.py), and two
``fleetpush server --database ... --store s3://BUCKET/releases`` processes on
127.0.0.1, each with its own data dir, plain TCP (``--insecure``: a local
try-out). Prints both addresses, the operator key it made, and the
environment and commands to publish and push; stops everything on Ctrl-C.

    python scripts/cluster_local.py [--dir DIR] [--check]

``--check`` stops as soon as both releasers listen and one of them leads
(tests/cluster/test_cluster_local.py runs it so). Needs the ``[test]`` extra
(psycopg, moto) and the ``postgresql`` package.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

import psycopg
from fleetpush.protocol.keys import private_key_to_pem, public_bytes
from fleetpush.server.cluster_bus import LEADER_KEY
from fp_pg import fresh_database, running_cluster
from fp_s3 import fresh_bucket, running_s3

from fleetpush.net.keys import generate_private_key


def _start(
    data: Path, url: str, store: str, key_hex: str, env: dict[str, str]
) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "fleetpush.cli.main", "server", "--data-dir", str(data),
         "--listen", "127.0.0.1:0", "--insecure", "--database", url, "--store", store,
         "--operator-key", key_hex],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("listening on"):
            return proc, line.split()[-1]
    raise SystemExit(f"fleetpush: cluster_local: the releaser in {data} did not start")


def _leader(url: str) -> str | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.objid = %s AND l.granted",
            (LEADER_KEY,),
        ).fetchone()
    return None if row is None else str(row[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where the data dirs and key go (default: temp)")
    parser.add_argument("--check", action="store_true", help="exit once both run and one leads")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        root = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fp-")))
        root.mkdir(parents=True, exist_ok=True)
        url = stack.enter_context(fresh_database(stack.enter_context(running_cluster())))
        bucket = stack.enter_context(fresh_bucket(stack.enter_context(running_s3())))
        store = f"s3://{bucket.name}/releases"
        env = {**os.environ, **bucket.env()}
        key = generate_private_key()
        key_file = root / "operator.key"
        key_file.write_bytes(private_key_to_pem(key))
        key_file.chmod(0o600)
        procs = []
        try:
            addresses = []
            for name in ("a", "b"):
                proc, address = _start(root / name, url, store, public_bytes(key).hex(), env)
                procs.append(proc)
                addresses.append(address)
            deadline = time.monotonic() + 30
            while (leader := _leader(url)) is None:
                if time.monotonic() > deadline:
                    print("fleetpush: cluster_local: no releaser took the lead", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            print(f"releaser A: {addresses[0]}   releaser B: {addresses[1]}   leader: {leader}")
            if args.check:
                return 0
            exports = " ".join(f"{k}={v}" for k, v in bucket.env().items())
            print(
                f"\nexport FLEETPUSH_DATABASE={url} {exports}\n"
                f"fleetpush release publish SRC --app demo --version 1.0.0 --key RELEASE.key"
                f" --data-dir {root / 'a'} --store {store}\n"
                f"fleetpush push demo 1.0.0 --all --insecure --server {addresses[1]}"
                f" --operator-key {key_file}\n"
                f'devices: server = ["{addresses[0]}", "{addresses[1]}"], insecure = true\n'
                "Ctrl-C stops everything."
            )
            with contextlib.suppress(KeyboardInterrupt):
                while all(p.poll() is None for p in procs):
                    time.sleep(1)
            return 0
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
