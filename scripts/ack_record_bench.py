"""CPU per push ack recorded by the releaser, in-process (issue 15, specs/SCALE.md §2).

Calls push_fanout.AckRecorder for N targets of one push on a fresh SQLite
database, with the releaser's stores and event hub sharing one write-behind,
flushing every FLUSH_EVERY acks; prints process CPU per ack (record + flush).
The network part of an ack (the reader's wake-up and decode) is not in it:
``fleetpush bench --idle`` measures the whole.

    python scripts/ack_record_bench.py [N]
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import attrs
from fleetpush.protocol import ResponseReceived
from fleetpush.protocol.messages import Ack
from fleetpush.server import db
from fleetpush.server.events import EventHub
from fleetpush.server.push_fanout import AckRecorder, shared_command
from fleetpush.server.registry import PushStore

FLUSH_EVERY = 200


@attrs.define
class Deps:
    pushes: PushStore
    events: EventHub


def main(n: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=open("/dev/null", "w"))  # noqa: SIM115
    with tempfile.TemporaryDirectory() as tmp:
        conn = db.open_database(Path(tmp))
        writer = db.WriteBehind(conn, max_pending=1000)
        deps = Deps(
            PushStore(conn, writer),
            EventHub(conn, history_limit=10_000, queue_size=10, writer=writer),
        )
        targets = [f"d{i}" for i in range(n)]
        ids = deps.pushes.create(
            push_id="p1", operator="op", app="app", version="2.0.0", mode="force",
            restart=True, selector={}, targets=targets, sent=set(targets), now=1.0,
        )  # fmt: skip
        writer.flush()
        command = shared_command("p1", "app", "2.0.0", "force", True)
        log = logging.getLogger("fleetpush.server.session")
        recorders = [AckRecorder(deps, log, d, ids[d], command) for d in targets]
        ack = ResponseReceived(id=1, method="__force_update__", result=Ack(accepted=True))
        t0 = time.process_time()
        for i, record in enumerate(recorders):
            record(ack)
            if i % FLUSH_EVERY == FLUSH_EVERY - 1:
                writer.flush()
        writer.flush()
        cpu = time.process_time() - t0
        conn.close()
    print(f"{cpu / n * 1e6:.1f} us per ack (record + flush), {n} acks")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
