"""The device's health fields and its local HTTP endpoint (issue 11, "Health endpoint and fields").

A real releaser on 127.0.0.1, a real ``fleetpush agent`` with ``health_listen``
set, HTTP over a plain socket, and ``fleetpush status --json`` beside it: both
answer ``{status, version, latestVersion, updateAvailable, schemaVersion,
state, uptime, pid, lastError, timestamp}``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from fleetpush.client.health import MAX_REQUEST, SCHEMA_VERSION, health_fields
from fp_agent import AgentDevice
from fp_releaser import publish, publish_and_approve, releaser
from fp_trees import app_release

FIELDS = {
    "status",
    "version",
    "latestVersion",
    "updateAvailable",
    "schemaVersion",
    "state",
    "uptime",
    "pid",
    "lastError",
    "timestamp",
}


def test_fields_before_and_after_a_check() -> None:
    doc = {"installed": "1.0.0", "newest": None, "update_available": False, "checked": False}
    before = health_fields(doc, now=0.0)
    assert set(before) == FIELDS
    assert before["latestVersion"] is None  # no check yet
    assert before["timestamp"] == "1970-01-01T00:00:00.000Z"
    assert before["schemaVersion"] == SCHEMA_VERSION
    assert health_fields({**doc, "checked": True})["latestVersion"] == "1.0.0"  # nothing newer
    # The installed version is never an update, whatever the source says.
    same = health_fields({**doc, "checked": True, "newest": "1.0.0", "update_available": True})
    assert same["updateAvailable"] is False
    newer = health_fields({**doc, "checked": True, "newest": "1.1.0", "update_available": True})
    assert (newer["latestVersion"], newer["updateAvailable"]) == ("1.1.0", True)
    app = {"app_state": "running", "pid": 42, "uptime": 1.23456, "connection": "connected"}
    ok = health_fields({**doc, **app, "trial": "1.0.0"})
    assert (ok["status"], ok["state"], ok["pid"], ok["uptime"]) == ("ok", "trial", 42, 1.235)
    down = health_fields({**doc, "app_state": "stopped", "pid": None})
    assert (down["status"], down["uptime"]) == ("down", None)
    lost = health_fields({**doc, **app, "connection": "connecting", "last_error": "x"})
    assert (lost["status"], lost["lastError"]) == ("degraded", "x")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _http(port: int, request: bytes) -> tuple[int, dict[str, Any] | None]:
    """Send ``request`` raw; the status code and the JSON body (None if none)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode()
    assert status_line.startswith("HTTP/1.1 "), data
    assert b"Content-Type: application/json" in head, head
    return int(status_line.split()[1]), json.loads(body) if body else None


async def _health(port: int) -> dict[str, Any]:
    code, doc = await _http(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 200 and doc is not None, (code, doc)
    return doc


@pytest.mark.slow
async def test_health_endpoint_and_status_answer_the_same_fields(tmp_path: Path) -> None:
    with trio.fail_after(90):
        data = tmp_path / "data"
        publish(data, app_release(tmp_path, "plain_app", "1.0.0"), "1.0.0", approved=True)
        async with releaser(data) as handle:
            port = _free_port()
            dev = AgentDevice(tmp_path, handle.port, health_listen=f"127.0.0.1:{port}")
            await dev.start_agent()
            try:
                await dev.wait_owner()
                while not dev.status.exists():  # the app has written its pid
                    await trio.sleep(0.05)
                doc = await _health(port)
                assert set(doc) == FIELDS, doc
                assert doc["status"] == "ok" and doc["version"] == "1.0.0", doc
                assert doc["latestVersion"] is None  # before the first check
                assert doc["pid"] == dev.app_pid() and doc["uptime"] >= 0, doc
                # A check: 1.0.0 is installed and approved, and is no update.
                ran = await dev.cli("status", "--check", "--json")
                assert ran.code == 0, ran
                doc = await _health(port)
                assert (doc["latestVersion"], doc["updateAvailable"]) == ("1.0.0", False), doc
                await publish_and_approve(
                    handle, data, app_release(tmp_path, "plain_app", "1.1.0"), "1.1.0"
                )
                own = (await dev.cli("status", "--check", "--json")).json()
                doc = await _health(port)
                assert (doc["latestVersion"], doc["updateAvailable"]) == ("1.1.0", True), doc
                # status --json carries the same fields, with the same values.
                assert set(own) >= FIELDS, own
                same = FIELDS - {"timestamp", "uptime"}
                assert {k: own[k] for k in same} == {k: doc[k] for k in same}, (own, doc)
                # Only GET /health; a bounded request head.
                assert (await _http(port, b"GET /other HTTP/1.1\r\n\r\n"))[0] == 404
                assert (await _http(port, b"POST /health HTTP/1.1\r\n\r\n"))[0] == 405
                huge = b"GET /health HTTP/1.1\r\nX: " + b"a" * (2 * MAX_REQUEST) + b"\r\n\r\n"
                assert (await _http(port, huge))[0] == 400
                assert (await _http(port, b"nonsense\r\n\r\n"))[0] == 400
                many = b"GET /health HTTP/1.1\r\n" + b"X: a\r\n" * 150 + b"\r\n"
                assert (await _http(port, many))[0] == 400
                assert (await _health(port))["status"] == "ok"  # still serving
            finally:
                await dev.stop_agents()
        # The agent is gone: so is its endpoint.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


async def test_health_is_off_by_default(tmp_path: Path) -> None:
    with trio.fail_after(30):
        data = tmp_path / "data"
        async with releaser(data) as handle:
            dev = AgentDevice(tmp_path, handle.port)
            await dev.start_agent()
            try:
                await dev.wait_owner()
                ran = await dev.cli("status", "--json")
                doc = ran.json()
                assert set(doc) >= FIELDS, doc  # the fields are in status all the same
                assert doc["latestVersion"] is None and doc["updateAvailable"] is False
            finally:
                await dev.stop_agents()
            assert "health endpoint" not in dev.log.read_text()


async def test_a_taken_port_is_reported_and_the_app_runs_all_the_same(tmp_path: Path) -> None:
    with trio.fail_after(30), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "data"
        async with releaser(data) as handle:
            dev = AgentDevice(tmp_path, handle.port, health_listen=f"127.0.0.1:{port}")
            await dev.start_agent()
            try:
                await dev.wait_owner()  # the app runs
                doc = (await dev.cli("status", "--json")).json()
                assert f"health endpoint 127.0.0.1:{port}" in doc["lastError"], doc
                assert doc["status"] == "degraded", doc
            finally:
                await dev.stop_agents()
