"""The PostgreSQL test fixtures (tests/support/fp_pg.py) against a real server.

These check the infrastructure the PostgreSQL storage backend of issue 15 will
be tested on: a real cluster reached over TCP on loopback, a fresh database
per test, LISTEN/NOTIFY between two connections, and the skip/require rule
for machines without PostgreSQL (fp_services.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from fp_pg import PG_BIN_ENV, PgCluster
from fp_services import REQUIRE_ENV, service_unavailable

REPO = Path(__file__).resolve().parents[2]


def connect(url: str, autocommit: bool = False) -> Any:
    # Imported here, not at the top: the pg_url fixture has already checked
    # psycopg is installed (or skipped), and the rule tests below need none.
    import psycopg

    return psycopg.connect(url, autocommit=autocommit, connect_timeout=10)


def test_a_table_round_trips_through_a_real_connection(pg_url: str) -> None:
    with connect(pg_url) as conn:
        conn.execute("CREATE TABLE devices (id text PRIMARY KEY, seq bigint NOT NULL)")
        conn.execute("INSERT INTO devices VALUES (%s, %s)", ("dev-1", 7))
        conn.execute("UPDATE devices SET seq = seq + 1 WHERE id = %s", ("dev-1",))
        conn.commit()
    with connect(pg_url) as conn:
        rows = conn.execute("SELECT id, seq FROM devices").fetchall()
    assert rows == [("dev-1", 8)]


def test_each_test_gets_its_own_empty_database(pg_cluster: PgCluster, pg_url: str) -> None:
    # The previous test's table must not be here: databases are per test.
    with connect(pg_url) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
        dbname = conn.execute("SELECT current_database()").fetchone()
    assert tables == []
    assert dbname is not None and pg_url.endswith("/" + dbname[0])
    assert pg_url.startswith(f"postgresql://fleetpush@127.0.0.1:{pg_cluster.port}/")


def test_the_cluster_listens_on_loopback_only(pg_url: str) -> None:
    with connect(pg_url) as conn:
        row = conn.execute("SELECT current_setting('listen_addresses')").fetchone()
    assert row == ("127.0.0.1",)


def test_listen_notify_crosses_between_two_connections(pg_url: str) -> None:
    # The releaser instances of issue 15 wake each other with NOTIFY; a
    # payload of ids up to the 8000-byte limit must arrive whole.
    payload = ",".join(f"d{i:05d}" for i in range(1300))[:7999]
    with (
        connect(pg_url, autocommit=True) as listener,
        connect(pg_url, autocommit=True) as notifier,
    ):
        listener.execute("LISTEN fleet_changes")
        notifier.execute("SELECT pg_notify('fleet_changes', %s)", (payload,))
        got = list(listener.notifies(timeout=10, stop_after=1))
    assert [(n.channel, n.payload) for n in got] == [("fleet_changes", payload)]


async def test_trio_tasks_share_a_pool_through_threads_under_a_limiter(pg_url: str) -> None:
    # The calling pattern issue 15 proposes and scripts/pg_bench.py measures:
    # synchronous psycopg_pool, one thread hop per transaction, a limiter no
    # larger than the pool so waiting happens in trio (cancellable), not in
    # a thread blocked inside the pool.
    import trio
    from psycopg_pool import ConnectionPool

    def bump(pool: ConnectionPool, device: str) -> None:
        with pool.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO devices VALUES (%s, 1)"
                " ON CONFLICT (id) DO UPDATE SET seq = devices.seq + 1",
                (device,),
            )

    with ConnectionPool(pg_url, min_size=1, max_size=4, open=True, timeout=10) as pool:
        with pool.connection() as conn:
            conn.execute("CREATE TABLE devices (id text PRIMARY KEY, seq bigint NOT NULL)")
        limiter = trio.CapacityLimiter(pool.max_size)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(
                        lambda d: trio.to_thread.run_sync(bump, pool, d, limiter=limiter),
                        f"dev-{i % 5}",
                    )
        with pool.connection() as conn:
            rows = conn.execute("SELECT id, seq FROM devices ORDER BY id").fetchall()
    assert rows == [(f"dev-{i}", 8) for i in range(5)]


def test_a_missing_service_skips_for_a_developer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL: not here"):
        service_unavailable("PostgreSQL", "not here")


def test_a_missing_service_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL: not here"):
        service_unavailable("PostgreSQL", "not here")


def _run_pg_test_without_postgres(
    tmp_path: Path, require: bool
) -> subprocess.CompletedProcess[str]:
    """A one-test pytest run, in a subprocess, on a machine 'without' PostgreSQL."""
    test = tmp_path / "test_needs_pg.py"
    test.write_text(textwrap.dedent("""
        def test_uses_the_database(pg_url):
            assert pg_url.startswith("postgresql://")
    """))
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ENV}
    env[PG_BIN_ENV] = str(tmp_path / "no-postgres-here")
    env["PYTHONPATH"] = str(REPO / "tests" / "support")
    if require:
        env[REQUIRE_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-c", str(REPO / "pyproject.toml"),
         "--rootdir", str(tmp_path), "-p", "fp_pg", "-p", "no:cacheprovider",
         "-q", "-rs", str(test)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_without_postgres_the_test_is_skipped_with_the_reason(tmp_path: Path) -> None:
    proc = _run_pg_test_without_postgres(tmp_path, require=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 skipped" in proc.stdout
    assert "PostgreSQL: no initdb in FLEETPUSH_PG_BIN" in proc.stdout


def test_without_postgres_under_require_services_the_run_fails(tmp_path: Path) -> None:
    proc = _run_pg_test_without_postgres(tmp_path, require=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 error" in proc.stdout
    assert "FLEETPUSH_REQUIRE_SERVICES=1, so this fails" in proc.stdout
