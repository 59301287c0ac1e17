"""The app's data in tests of issue 12: a real SQLite database and a real migration script.

:data:`MIGRATE_SRC` is a release's ``migrate.py``, run by the device as its
``migrate_command``. It reads ``FLEETPUSH_SCHEMA_FROM``/``TO`` and acts as
``migrate.txt`` beside it says:

* ``ok``: for each schema step, add a column ``s<N>`` to ``items`` and set
  ``PRAGMA user_version`` to the target; writes ``migrated FROM TO`` to
  ``migrate.log`` (appended) in the app root;
* ``fail``: make the first step's change and commit it (so the data really is
  half migrated), then print ``error: column s<N> cannot be filled`` to stderr
  and exit 1;
* ``slow``: make the first step's change and commit it, write its pid to
  ``migrate.pid`` in the app root, then sleep a minute (a kill -9 of the
  agent lands here); if ``migrate.pid`` already exists it behaves as ``ok``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

MIGRATE_SRC = r"""
import os, sqlite3, sys, time
from pathlib import Path

here = Path(__file__).resolve().parent
mode = (here / "migrate.txt").read_text().strip()
start = os.environ["FLEETPUSH_SCHEMA_FROM"]
to = int(os.environ["FLEETPUSH_SCHEMA_TO"])
root = Path(os.environ["FLEETPUSH_APP_ROOT"])
assert Path.cwd() == root, (Path.cwd(), root)
db = sqlite3.connect(root / "data" / "app.db")
first = int(start) + 1 if start else 1
pid_file = root / "migrate.pid"
if mode == "slow" and pid_file.exists():
    mode = "ok"
for n in range(first, to + 1):
    db.execute(f"ALTER TABLE items ADD COLUMN s{n} TEXT")
    db.commit()
    if mode == "fail":
        print("migrating...", file=sys.stderr)
        print(f"error: column s{n} cannot be filled", file=sys.stderr)
        sys.exit(1)
    if mode == "slow":
        pid_file.write_text(str(os.getpid()))
        time.sleep(60)
db.execute(f"PRAGMA user_version = {to}")
db.commit()
with open(root / "migrate.log", "a") as f:
    f.write(f"migrated {start or '-'} {to} {os.environ['FLEETPUSH_VERSION']}\n")
"""


def make_db(path: Path, rows: int = 20, *, wal: bool = False) -> sqlite3.Connection:
    """A database with a table ``items`` of ``rows`` rows at user_version 1; left open.

    With ``wal`` the database is in WAL mode with automatic checkpoints off, so
    every committed row stays in ``app.db-wal`` while the connection is open.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    db.executemany("INSERT INTO items (name) VALUES (?)", [(f"item {i}",) for i in range(rows)])
    db.execute("PRAGMA user_version = 1")
    db.commit()
    return db


def dump(path: Path) -> str:
    """The database's content as SQL (schema, rows and user_version)."""
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        return "\n".join([*db.iterdump(), f"-- user_version {version}"])
    finally:
        db.close()


def add_row(path: Path, name: str) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute("INSERT INTO items (name) VALUES (?)", (name,))
        db.commit()
    finally:
        db.close()
