"""How long one storage call holds the releaser's trio thread, per backend (issue 15).

Both backends run on the trio thread today (server/pg.py): this measures what
that costs per call, on a registry of 10,000 devices: an indexed read (what
``DeviceRegistry.get`` sends at each handshake), one autocommit update, and a
WriteBehind flush of 999 queued updates (one transaction, ``executemany``:
pipeline mode on PostgreSQL). Run it on SQLite, then on PostgreSQL with::

    python scripts/storage_calls_bench.py
    python scripts/with_postgres.py -- python scripts/storage_calls_bench.py

(``FLEETPUSH_DATABASE`` selects PostgreSQL; with_postgres.py's throwaway
cluster runs with fsync off, so its write figures are a lower bound.)
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from fleetpush.server import db

DEVICES = 10_000


def main() -> None:
    database = os.environ.get(db.DATABASE_ENV)
    with tempfile.TemporaryDirectory(prefix="fp-calls-") as tmp:
        conn = db.open_database(Path(tmp), database)
        with db.transaction(conn):
            conn.executemany(
                "INSERT INTO devices (device_id, public_key, enrollment, first_seen, last_seen)"
                " VALUES (?, ?, 'accepted', 1, 1)",
                [(f"d{i}", b"k") for i in range(DEVICES)],
            )
        n = 5000
        t = time.perf_counter()
        for i in range(n):
            conn.execute("SELECT * FROM devices WHERE device_id = ?", (f"d{i}",)).fetchone()
        read_ms = (time.perf_counter() - t) / n * 1e3
        t = time.perf_counter()
        for i in range(500):
            conn.execute("UPDATE devices SET last_seen = ? WHERE device_id = ?", (3.0, f"d{i}"))
        update_ms = (time.perf_counter() - t) / 500 * 1e3
        writer = db.WriteBehind(conn)
        for i in range(999):  # below max_pending: add() does not flush by itself
            writer.add("UPDATE devices SET last_seen = ? WHERE device_id = ?", (2.0, f"d{i}"))
        t = time.perf_counter()
        writer.flush()
        flush_ms = (time.perf_counter() - t) * 1e3
        conn.close()
    print(
        f"{'postgres' if database else 'sqlite'}: indexed read {read_ms:.3f} ms, autocommit"
        f" update {update_ms:.3f} ms, WriteBehind flush of 999 updates {flush_ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
