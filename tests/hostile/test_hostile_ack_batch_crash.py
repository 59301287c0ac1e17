"""kill -9 of the releaser after a device's ack, before the batch holding it commits (issue 15).

A push's acks are written behind, in batches (db.WriteBehind, server/
push_fanout.py): an ack the releaser read but had not committed when it died
is lost, and that is allowed because the target row still says ``sent``,
so the push is offered again when the device reconnects (specs/PROTOCOL.md
§7.4), and the device persisted the command before acknowledging it, so the
repeated offer changes nothing on its side (it answers "held").

Real parts: a ``fleetpush server`` subprocess on a SQLite data dir, a real
``fleetpush agent`` process, and a TCP relay between them (port 0) that can
hold the device's bytes. To make "before the commit" certain, not a race with
the 0.1 s flush, the test holds the SQLite write lock itself while the ack is
let through, so the releaser's flush keeps the row queued; then SIGKILL.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import trio
from fleetpush.client.forced_push import pending_push
from fleetpush.server import db
from fp_agent import AgentDevice
from fp_keys import OPERATOR_KEY, key_hex
from fp_releaser import publish, start_releaser_process
from fp_trees import app_release

from fleetpush.operator import connect as operator_connect

pytestmark = pytest.mark.slow


class Relay:
    """127.0.0.1:port 0 -> the releaser's current port; ``up`` holds device -> releaser."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.up = trio.Event()
        self.up.set()
        self.bytes_up = 0
        self.port = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, device: trio.SocketStream) -> None:
        try:
            releaser = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            await device.aclose()
            return
        async with device, releaser, trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, device, releaser, True, nursery.cancel_scope)
            nursery.start_soon(self._pipe, releaser, device, False, nursery.cancel_scope)

    async def _pipe(
        self, src: trio.SocketStream, dst: trio.SocketStream, up: bool, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await src.receive_some(65536):
                if up:
                    await self.up.wait()
                    self.bytes_up += len(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # one side ended: end the other (the device reconnects)


def _start(data: Path) -> tuple[subprocess.Popen[str], int]:
    return start_releaser_process(
        "--data-dir", str(data), "--listen", "127.0.0.1:0",
        "--operator-key", key_hex(OPERATOR_KEY), "--insecure",
    )  # fmt: skip


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _target(data: Path) -> tuple[str, str | None]:
    conn = db.open_database(data)
    try:
        row = conn.execute("SELECT state, result FROM push_targets").fetchone()
        return str(row[0]), row[1]
    finally:
        conn.close()


async def test_an_ack_lost_with_its_uncommitted_batch_is_offered_again_and_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLEETPUSH_DATABASE", raising=False)  # this test is about SQLite
    data = tmp_path / "data"
    publish(data, app_release(tmp_path, "plain_app", "2.0.0"), "2.0.0", approved=True)
    proc, port = _start(data)
    procs = [proc]
    relay = Relay(port)
    dev: AgentDevice | None = None
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                await nursery.start(relay.run)
                dev = AgentDevice(tmp_path, relay.port, heartbeat=2.0, confirm_after=0.5)
                await dev.start_agent()
                await dev.wait_owner()
                await trio.sleep(0.5)  # its hello and reports settled before the hold

                relay.up = trio.Event()  # hold the device's bytes: its ack waits here
                async with operator_connect(("127.0.0.1", port), OPERATOR_KEY) as op:
                    await op.push(app="demo", version="2.0.0", mode="force", devices=["dev-1"])
                # Persisted before acknowledged (§7.4): the command is the device's now.
                await dev.wait_state(lambda s: pending_push(s) is not None)
                assert _target(data) == ("sent", None)

                # The releaser's next flushes find the database locked: rows stay queued.
                lock = sqlite3.connect(db.db_path(data), isolation_level=None)
                lock.execute("BEGIN IMMEDIATE")
                try:
                    held = relay.bytes_up
                    relay.up.set()  # the ack reaches the releaser...
                    while relay.bytes_up == held:
                        await trio.sleep(0.05)
                    await trio.sleep(1.0)  # ...which reads it and queues its row
                    _kill(proc)  # ...and dies before any batch holding it commits
                finally:
                    lock.execute("ROLLBACK")
                    lock.close()
                assert _target(data) == ("sent", None)  # the ack was lost with the batch

                proc, relay.target = _start(data)  # same data dir; the relay follows
                procs.append(proc)
                # Offered again on reconnect; the device holds it already and finishes once.
                await dev.wait_state(
                    lambda s: s.installed_version == "2.0.0" and s.trial is None, timeout=90
                )
                with trio.fail_after(30):
                    while _target(data) != ("accepted", "committed"):
                        await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
    finally:
        if dev is not None:
            await dev.stop_agents()
        for p in procs:
            _kill(p)
