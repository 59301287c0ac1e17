"""A real, throwaway PostgreSQL cluster for the tests (issue 15, PostgreSQL backend).

:func:`running_cluster` runs Debian's own binaries (``initdb`` into a fresh
temp dir, ``pg_ctl start`` on a free 127.0.0.1 port with its socket in the
same dir) and always stops the server and removes the dir, even when the
block fails. Fixtures, registered for every test by tests/conftest.py:

- ``pg_cluster`` (session): the running cluster, started once per run.
- ``pg_url`` (function): a fresh, empty database of that cluster for one test,
  as a ``postgresql://`` URL; dropped after the test (``WITH (FORCE)``, so a
  connection the test leaked cannot keep it alive).

A test using either is marked ``postgres`` automatically, so
``pytest -m "not postgres"`` deselects them. Without PostgreSQL or psycopg
installed they are skipped, or fail under ``FLEETPUSH_REQUIRE_SERVICES=1``
(fp_services.py). scripts/pg_bench.py uses :func:`running_cluster` too.

initdb refuses to run as root, and CI runs as root: then the cluster belongs
to the unprivileged ``nobody`` (``runuser``), in a dir under the system temp
dir (``nobody`` cannot enter pytest's root-only ``tmp_path``). A cluster is
left running only if the test process is killed outright (SIGKILL).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
from fp_services import service_unavailable

# The server user the tests connect as (trust auth on a private socket dir
# and loopback only: nothing outside this machine can reach the cluster).
PG_USER = "fleetpush"
# Every test database is copied from this one: an empty template of our own,
# so nothing a test does to template1 leaks into the next test.
TEMPLATE_DB = "fleetpush_template"

# Durability is irrelevant for a cluster deleted at the end of the run, and
# fsync per commit would make every test wait for the (shared) disk.
TEST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
}

PG_BIN_ENV = "FLEETPUSH_PG_BIN"
_RUN_TIMEOUT = 120.0
_START_TRIES = 3


class PgUnavailable(Exception):
    """PostgreSQL cannot be run here; the message says why and what to install."""


@attrs.frozen(kw_only=True)
class PgCluster:
    """A running cluster: where it lives and how to reach it."""

    bin_dir: Path
    base: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "sock"

    @property
    def log_file(self) -> Path:
        return self.base / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        """A libpq ``postgresql://`` URL of ``dbname`` over TCP on loopback."""
        return f"postgresql://{PG_USER}@{self.host}:{self.port}/{dbname}"


def find_bin_dir() -> Path:
    """The dir holding ``initdb``, ``pg_ctl`` and ``postgres``.

    ``initdb`` on PATH first; else Debian's /usr/lib/postgresql/<ver>/bin
    (the package does not put the server binaries on PATH), newest version.
    ``FLEETPUSH_PG_BIN`` names the dir outright (another install, or a
    missing one to check the skip/require rule). Raises PgUnavailable.
    """
    override = os.environ.get(PG_BIN_ENV)
    if override:
        if not (Path(override) / "initdb").exists():
            raise PgUnavailable(f"no initdb in {PG_BIN_ENV}={override}")
        return Path(override)
    found = shutil.which("initdb")
    if found is not None:
        # Resolve a symlink such as /usr/local/bin/initdb: pg_ctl and postgres
        # are beside the real file, not necessarily beside the link.
        real = Path(found).resolve().parent
        if (real / "pg_ctl").exists():
            return real
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        raise PgUnavailable(
            "initdb not found on PATH nor in /usr/lib/postgresql/*/bin"
            " [apt-get install postgresql]"
        )
    newest = max(candidates, key=lambda p: _version_key(Path(p).parent.parent.name))
    return Path(newest).parent


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _as_server_user() -> tuple[list[str], int | None]:
    """The command prefix and uid to run the server binaries with.

    As root: ``nobody`` via ``runuser`` (initdb and postgres refuse root).
    """
    if os.geteuid() != 0:
        return [], None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PgUnavailable("running as root and runuser is missing [apt-get install util-linux]")
    return [runuser, "-u", "nobody", "--"], pwd.getpwnam("nobody").pw_uid


def _run(cmd: list[str], what: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_RUN_TIMEOUT, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PgUnavailable(f"{what}: {e}") from e
    if proc.returncode != 0:
        raise PgUnavailable(f"{what} exited {proc.returncode}: {proc.stderr.strip()[-800:]}")


def _options(port: int, socket_dir: Path, settings: Mapping[str, str]) -> str:
    opts = [f"-p {port}", f"-k {socket_dir}", "-c listen_addresses=127.0.0.1"]
    opts += [f"-c {key}={value}" for key, value in settings.items()]
    return " ".join(opts)


@contextlib.contextmanager
def running_cluster(settings: Mapping[str, str] = TEST_SETTINGS) -> Iterator[PgCluster]:
    """A fresh cluster for the block, stopped and deleted afterwards.

    Raises PgUnavailable when PostgreSQL is missing or will not start.
    """
    _import_psycopg()  # before initdb: without the client the cluster is no use
    bin_dir = find_bin_dir()
    prefix, uid = _as_server_user()
    base = Path(tempfile.mkdtemp(prefix="fleetpush-pg-"))
    try:
        (base / "sock").mkdir()
        if uid is not None:
            for path in (base, base / "sock"):
                os.chown(path, uid, -1)
        data = base / "data"
        _run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER,
             "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
            "initdb",
        )  # fmt: skip
        cluster = _start(bin_dir, base, prefix, settings)
        _make_template(cluster)
        yield cluster
    finally:
        if (base / "data" / "postmaster.pid").exists():
            with contextlib.suppress(PgUnavailable):
                _run(
                    [*prefix, str(bin_dir / "pg_ctl"), "-D", str(base / "data"),
                     "-m", "immediate", "-w", "-t", "60", "stop"],
                    "pg_ctl stop",
                )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


def _start(
    bin_dir: Path, base: Path, prefix: list[str], settings: Mapping[str, str]
) -> PgCluster:
    """``pg_ctl start`` on a free port; another try on a new port if it was taken."""
    failure = PgUnavailable("pg_ctl start was not tried")
    for _ in range(_START_TRIES):
        cluster = PgCluster(bin_dir=bin_dir, base=base, port=_free_port())
        try:
            _run(
                [*prefix, str(bin_dir / "pg_ctl"), "-D", str(cluster.data_dir),
                 "-l", str(cluster.log_file), "-w", "-t", "60",
                 "-o", _options(cluster.port, cluster.socket_dir, settings), "start"],
                "pg_ctl start",
            )  # fmt: skip
        except PgUnavailable as e:
            log = _log_tail(cluster)
            failure = PgUnavailable(f"{e}; server log: {log}")
            # Another process may have taken the port between our probe and
            # the server's bind: only that failure is worth another try.
            if "could not bind" not in log and "Address already in use" not in log:
                raise failure from e
            continue
        return cluster
    raise failure


def _log_tail(cluster: PgCluster) -> str:
    try:
        return cluster.log_file.read_text(errors="replace").strip()[-800:]
    except OSError:
        return "(no log)"


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as e:
        raise PgUnavailable("psycopg is not installed [pip install -e '.[postgres]']") from e
    return psycopg


def _connect_admin(cluster: PgCluster) -> Any:
    """An autocommit connection to the ``postgres`` db (CREATE/DROP DATABASE)."""
    psycopg = _import_psycopg()
    try:
        return psycopg.connect(cluster.url("postgres"), autocommit=True, connect_timeout=30)
    except psycopg.Error as e:
        raise PgUnavailable(f"cannot connect to the test cluster: {e}") from e


def _make_template(cluster: PgCluster) -> None:
    with _connect_admin(cluster) as conn:
        conn.execute(f"CREATE DATABASE {TEMPLATE_DB} TEMPLATE template0")
        conn.execute(f"ALTER DATABASE {TEMPLATE_DB} WITH ALLOW_CONNECTIONS false")


_db_numbers = itertools.count(1)


@contextlib.contextmanager
def fresh_database(cluster: PgCluster) -> Iterator[str]:
    """A new empty database for the block, as a URL; dropped afterwards.

    FILE_COPY: with fsync off, copying the small template's files beats
    PostgreSQL 15's default WAL_LOG strategy (median of 20 each, here on a
    loaded 2-core machine: 69-91 ms against 85-106 ms). Raises PgUnavailable.
    """
    name = f"t{os.getpid()}_{next(_db_numbers)}"
    with _connect_admin(cluster) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB} STRATEGY FILE_COPY")
    try:
        yield cluster.url(name)
    finally:
        with _connect_admin(cluster) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the cluster ``postgres`` (before ``-m`` selects)."""
    for item in items:
        if "pg_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The run's PostgreSQL cluster (started on first use)."""
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(running_cluster())
        except PgUnavailable as e:
            service_unavailable("PostgreSQL", str(e))
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh empty database of the run's cluster, as a ``postgresql://`` URL."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(fresh_database(pg_cluster))
        except PgUnavailable as e:
            service_unavailable("PostgreSQL", str(e))
        yield url
