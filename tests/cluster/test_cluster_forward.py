"""Operator commands that need a device's live link work through any releaser (issue 15, part 2).

Two real releasers on one PostgreSQL (tests/support/fp_pg.py), a real
``fleetpush agent`` connected to B only, an operator on A. A forwards
``app_control`` and the tail of ``app_logs`` through a ``forwarded_calls`` row
(server/cluster_calls.py); B runs them on its live link. Marked ``postgres``
by the pg_url fixture.
"""

from __future__ import annotations

import http.client
import os
import re
import secrets
import signal
import sys
import time
import urllib.parse
from contextlib import aclosing
from pathlib import Path

import psycopg
import pytest
import trio
from cluster_helpers import two_releasers, until
from fleetpush.protocol import FleetpushError
from fleetpush.server import app_remote, cluster_rows
from fleetpush.server.web.login import make_token
from fp_agent import AgentDevice
from fp_keys import OPERATOR_KEY, key_hex
from fp_releaser import releaser, start_releaser_process

from fleetpush.operator import connect as operator_connect

#: An app that prints a numbered line every 50 ms (its logs have lines at once).
TICKER = [
    sys.executable, "-u", "-c",
    "import itertools, time\n"
    "for i in itertools.count():\n"
    "    print(f'tick {i}', flush=True)\n"
    "    time.sleep(0.05)\n",
]  # fmt: skip


def _call_states(pg_url: str) -> list[str]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return [str(r[0]) for r in conn.execute("SELECT state FROM forwarded_calls")]


async def test_an_operator_on_a_restarts_and_reads_the_app_of_a_device_on_b(
    tmp_path: Path, pg_url: str
) -> None:
    with trio.fail_after(120):
        async with two_releasers(tmp_path / "data", pg_url) as (a, b):
            dev = AgentDevice(tmp_path / "d1", b.port, device_id="d1")
            await dev.start_agent(TICKER)
            try:
                await dev.wait_owner()
                await until(lambda: "d1" in b.services.fleet)
                await until(lambda: a.services.leases.holders(["d1"], time.time()).get("d1"))
                assert "d1" not in a.services.fleet
                async with operator_connect(("127.0.0.1", a.port), OPERATOR_KEY, name="ops") as op:
                    # The tail of its logs, through A (one process's lines: before the restarts).
                    with trio.fail_after(20):
                        while len(tail := await op.app_logs("d1", 5)) < 5:
                            await trio.sleep(0.1)
                    assert all(line.startswith("tick ") for line in tail)
                    numbers = [int(line.split()[1]) for line in tail]
                    assert numbers == sorted(numbers) and numbers[-1] - numbers[0] == 4
                    (first,) = await op.app_control("restart", ["d1"])
                    assert first.ok, first.error
                    assert first.status is not None and first.status.pid is not None
                    (second,) = await op.app_control("restart", ["d1"])
                    assert second.ok, second.error
                    assert second.status is not None
                    assert second.status.pid not in (None, first.status.pid)  # a new process
                    # Following is not forwarded: the line names where to follow it.
                    with pytest.raises(FleetpushError) as refused:
                        async with aclosing(op.follow_logs("d1", 3)) as follow:
                            async for _ in follow:
                                break
                    where = f"127.0.0.1:{b.port}"
                    assert str(refused.value).endswith(f"[follow it there: --server {where}]")
                    # Audited once per restart, by B (which asked the device), under
                    # the operator's name as a local call is; A added none of its own.
                    # (B writes its events behind, within a flush interval.)
                    with trio.fail_after(10):
                        while len(audit := await op.list_events(kinds=["app_control"])) < 2:
                            await trio.sleep(0.1)
                assert [
                    (e.device_id, e.data["action"], e.data["ok"], e.data["operator"].split()[0])
                    for e in audit
                ] == [("d1", "restart", True, "ops")] * 2
                assert a.services.cluster is not None and b.services.cluster is not None
                asked, served = a.services.cluster.calls.figures, b.services.cluster.calls.figures
                assert asked.answered == asked.forwarded == served.served >= 3
                assert asked.timed_out == 0 and served.forwarded == 0
                assert _call_states(pg_url) == ["done"] * asked.forwarded
            finally:
                await dev.stop_agents()


async def test_a_request_b_missed_on_the_bus_is_served_from_the_rows(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(120):
        async with two_releasers(tmp_path / "data", pg_url) as (a, b):
            assert a.services.cluster is not None and b.services.cluster is not None
            dev = AgentDevice(tmp_path / "d1", b.port, device_id="d1")
            await dev.start_agent(TICKER)
            try:
                await dev.wait_owner()
                await until(lambda: "d1" in b.services.fleet)
                # Nothing reaches the bus: neither the request nor its answer.
                monkeypatch.setattr(cluster_rows, "send_notify", lambda conn, payload: None)
                async with operator_connect(("127.0.0.1", a.port), OPERATOR_KEY) as op:
                    outcome: list[object] = []

                    async def restart() -> None:
                        outcome.extend(await op.app_control("restart", ["d1"]))

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(restart)
                        await until(lambda: _call_states(pg_url) == ["pending"])
                        await trio.sleep(1.0)
                        assert _call_states(pg_url) == ["pending"]  # nothing told B
                        # B's bus connection dies; on reconnect it reads the rows.
                        pid = b.services.cluster.link.backend_pid
                        assert pid is not None
                        with psycopg.connect(pg_url, autocommit=True) as admin:
                            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    (result,) = outcome
                    assert getattr(result, "ok", False), result
                assert b.services.cluster.link.backend_pid not in (None, pid)
                assert _call_states(pg_url) == ["done"]  # A read the answer from the row
            finally:
                await dev.stop_agents()


async def test_a_holder_stopped_then_killed_with_a_call_pending_is_a_timeout_on_a(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short deadlines, so that both calls fit in B's lease's life after it stops
    # renewing (leases.ALIVE_FOR, 10 s): past it A would not forward at all.
    monkeypatch.setattr(app_remote, "FORWARD_CONTROL_TIMEOUT", 3.0)
    monkeypatch.setattr(app_remote, "FORWARD_LOGS_TIMEOUT", 2.0)
    data = tmp_path / "data"
    with trio.fail_after(120):
        async with releaser(data, database=pg_url) as a:
            proc, port_b = start_releaser_process(
                "--data-dir", str(data), "--listen", "127.0.0.1:0", "--database", pg_url,
                "--operator-key", key_hex(OPERATOR_KEY), "--insecure",
            )  # fmt: skip
            dev = AgentDevice(tmp_path / "d1", port_b, device_id="d1")
            try:
                await dev.start_agent()
                await dev.wait_owner(timeout=60)
                await until(lambda: a.services.leases.holders(["d1"], time.time()).get("d1"))
                os.kill(proc.pid, signal.SIGSTOP)  # B hangs: the call stays pending
                async with operator_connect(("127.0.0.1", a.port), OPERATOR_KEY) as op:
                    with pytest.raises(FleetpushError) as late, trio.fail_after(10):
                        await op.app_logs("d1")
                    assert str(late.value).endswith(
                        f"releaser 127.0.0.1:{port_b} holding device d1 did not answer in 2 s"
                    )
                    outcome: list[object] = []

                    async def restart() -> None:
                        outcome.extend(await op.app_control("restart", ["d1"]))

                    with trio.fail_after(15):  # the 3 s deadline, with slack
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(restart)
                            await until(lambda: _call_states(pg_url) == ["pending"] * 2)
                            proc.kill()  # kill -9 with the call pending
                    (result,) = outcome
                assert not getattr(result, "ok", True)
                assert getattr(result, "error", None) == (
                    f"releaser 127.0.0.1:{port_b} holding device d1 did not answer in 3 s"
                )
                assert _call_states(pg_url) == ["pending"] * 2  # never run: B died
            finally:
                await dev.stop_agents()
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()


async def test_a_holder_killed_is_answered_once_its_liveness_row_expires_not_at_the_deadline(
    tmp_path: Path, pg_url: str
) -> None:
    """With the production deadline (65 s), a kill -9 of B costs the operator on A
    at most B's liveness window (leases.ALIVE_FOR, 10 s) and one recheck."""
    data = tmp_path / "data"
    with trio.fail_after(120):
        async with releaser(data, database=pg_url) as a:
            proc, port_b = start_releaser_process(
                "--data-dir", str(data), "--listen", "127.0.0.1:0", "--database", pg_url,
                "--operator-key", key_hex(OPERATOR_KEY), "--insecure",
            )  # fmt: skip
            dev = AgentDevice(tmp_path / "d1", port_b, device_id="d1")
            try:
                await dev.start_agent()
                await dev.wait_owner(timeout=60)
                await until(lambda: a.services.leases.holders(["d1"], time.time()).get("d1"))
                proc.kill()
                await trio.to_thread.run_sync(proc.wait)
                async with operator_connect(("127.0.0.1", a.port), OPERATOR_KEY) as op:
                    with trio.fail_after(10 + 1 + 5):  # ALIVE_FOR + RECHECK + slack
                        (result,) = await op.app_control("restart", ["d1"])
                    assert not result.ok
                    assert result.error is not None
                    assert result.error.startswith(
                        f"releaser 127.0.0.1:{port_b} holding device d1 did not answer in "
                    )
                    assert result.error.endswith(
                        "stopped renewing its liveness row (killed or cut off)"
                    )
                    # Its lease is now free: the next call is not forwarded at all.
                    (again,) = await op.app_control("restart", ["d1"])
                    assert (again.ok, again.error) == (False, "not connected")
            finally:
                await dev.stop_agents()
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()


def _app_pid(dev: AgentDevice) -> int | None:
    """The plain app's pid from its status file, once it wrote one."""
    try:
        return dev.app_pid()
    except (OSError, IndexError, ValueError):
        return None


def _http(
    base: str, path: str, form: dict[str, str] | None, cookie: str | None
) -> tuple[int, dict[str, str], str]:
    """One request to the dashboard (no redirects followed): status, headers, body."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        headers = {} if cookie is None else {"cookie": f"fp_session={cookie}"}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["content-type"] = "application/x-www-form-urlencoded"
        conn.request("GET" if form is None else "POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    finally:
        conn.close()


async def test_the_dashboard_on_a_restarts_the_app_of_a_device_on_b(
    tmp_path: Path, pg_url: str
) -> None:
    with trio.fail_after(120):
        async with two_releasers(tmp_path / "data", pg_url, http="127.0.0.1:0") as (a, b):
            base = a.http_url
            assert base is not None
            dev = AgentDevice(tmp_path / "d1", b.port, device_id="d1")
            await dev.start_agent()
            try:
                await dev.wait_owner()
                await until(lambda: a.services.leases.holders(["d1"], time.time()).get("d1"))
                pid = await until(lambda: _app_pid(dev))
                link = make_token(
                    OPERATOR_KEY, "web-ops", now=time.time(), nonce=secrets.token_bytes(16)
                )

                def restart_through_the_page() -> str:
                    status, headers, _ = _http(base, "/login", {"token": link}, None)
                    assert status == 303, status
                    cookie = headers["set-cookie"].split(";")[0].split("=", 1)[1]
                    _, _, page = _http(base, "/devices/d1", None, cookie)
                    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
                    assert csrf is not None, page[:500]
                    form = {"action": "restart", "csrf": csrf.group(1)}
                    status, headers, _ = _http(base, "/devices/d1/app", form, cookie)
                    assert (status, headers["location"]) == (303, "/devices/d1")
                    return _http(base, "/devices/d1", None, cookie)[2]

                after = await trio.to_thread.run_sync(restart_through_the_page)
                assert "app restart: running" in after
                await until(lambda: _app_pid(dev) not in (None, pid))  # a new app process
            finally:
                await dev.stop_agents()
