"""The agent's child record and parent-death guard (client/child_record.py), on real processes.

A leftover child is stopped only if its pid still has the recorded /proc
start time; its whole process group goes (SIGTERM, then SIGKILL); a record
of an agent that is still running is refused; the guard stops the group when
its pipe closes (the agent died) and leaves a process that is not the
recorded one alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from fleetpush.client.child_record import (
    ChildRecord,
    guard_command,
    proc_start_time,
    same_process,
    stop_leftover,
)
from fleetpush.client.errors import UpdaterError

#: An app that ignores SIGTERM and leaves a grandchild in its group; prints both pids.
STUBBORN = (
    "import os, signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(os.getpid(), g.pid, flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        for pipe in (p.stdin, p.stdout):
            if pipe is not None:
                pipe.close()


def spawn(procs: list[subprocess.Popen[bytes]], source: str) -> subprocess.Popen[bytes]:
    """A python process in its own session, as the agent starts the app."""
    p = subprocess.Popen(
        [sys.executable, "-c", source], stdout=subprocess.PIPE, start_new_session=True
    )
    procs.append(p)
    return p


def record(
    path: Path, pid: int, start: int, agent_pid: int = 0, agent_start: int | None = None
) -> ChildRecord:
    """Write a child record as an agent would (agent_pid 0: an agent long gone)."""
    rec = ChildRecord(
        pid=pid, start_time=start, pgid=pid, agent_pid=agent_pid, agent_start_time=agent_start
    )
    path.write_text(json.dumps(rec.to_json()))
    return rec


async def gone(pid: int, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while proc_start_time(pid) is not None:
            await trio.sleep(0.02)


async def test_a_leftover_group_that_ignores_sigterm_is_killed(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    app = spawn(procs, STUBBORN)
    assert app.stdout is not None
    pid, grandchild = map(int, app.stdout.readline().split())
    start = proc_start_time(pid)
    assert start is not None
    path = tmp_path / "agent-child.json"
    record(path, pid, start)
    with trio.fail_after(20):
        found = await stop_leftover(path, stop_timeout=0.5)
    assert found is not None and "SIGKILL after 0.5s" in found and f"pid {pid}" in found
    app.wait(timeout=5)
    await gone(grandchild)  # the whole group, not only the leader
    assert not path.exists()


async def test_a_reused_pid_is_never_signalled(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    other = spawn(procs, "import time; time.sleep(60)")
    start = proc_start_time(other.pid)
    assert start is not None
    path = tmp_path / "agent-child.json"
    record(path, other.pid, start - 1)  # same pid, another process (another start time)
    with trio.fail_after(10):
        found = await stop_leftover(path, stop_timeout=0.5)
    assert found is not None and "nothing to stop" in found
    assert same_process(other.pid, start)
    assert not path.exists()


async def test_the_child_of_a_running_agent_is_not_touched(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    agent = spawn(procs, "import time; time.sleep(60)")
    app = spawn(procs, "import time; time.sleep(60)")
    agent_start, app_start = proc_start_time(agent.pid), proc_start_time(app.pid)
    assert agent_start is not None and app_start is not None
    path = tmp_path / "agent-child.json"
    record(path, app.pid, app_start, agent.pid, agent_start)
    with trio.fail_after(10), pytest.raises(UpdaterError, match="another agent"):
        await stop_leftover(path, stop_timeout=0.5)
    assert same_process(app.pid, app_start)
    assert path.exists()


@pytest.mark.parametrize("text", ["", "{not json", '{"pid": "x"}', "[]"])
async def test_a_bad_record_is_ignored_and_removed(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent-child.json"
    path.write_text(text)
    found = await stop_leftover(path, stop_timeout=0.5)
    assert found is not None and "ignored" in found
    assert not path.exists()
    assert await stop_leftover(path, stop_timeout=0.5) is None


async def test_the_guard_stops_the_group_when_the_agent_is_gone(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    app = spawn(procs, STUBBORN)
    assert app.stdout is not None
    pid, grandchild = map(int, app.stdout.readline().split())
    start = proc_start_time(pid)
    assert start is not None
    rec = ChildRecord(
        pid=pid, start_time=start, pgid=pid, agent_pid=os.getpid(), agent_start_time=None
    )
    guard = subprocess.Popen(guard_command(rec, 0.5), stdin=subprocess.PIPE)
    procs.append(guard)
    assert guard.stdin is not None
    await trio.sleep(0.3)
    assert guard.poll() is None and same_process(pid, start)  # waits while the pipe is open
    guard.stdin.close()  # what the kernel does when the agent dies
    assert guard.wait(timeout=10) == 0
    app.wait(timeout=5)
    await gone(grandchild)


async def test_the_guard_leaves_another_process_alone(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    other = spawn(procs, "import time; time.sleep(60)")
    start = proc_start_time(other.pid)
    assert start is not None
    rec = ChildRecord(
        pid=other.pid, start_time=start - 1, pgid=other.pid, agent_pid=0, agent_start_time=None
    )
    guard = subprocess.Popen(guard_command(rec, 0.5), stdin=subprocess.PIPE)
    procs.append(guard)
    assert guard.stdin is not None
    guard.stdin.close()
    assert guard.wait(timeout=10) == 0
    await trio.sleep(0.2)
    assert same_process(other.pid, start)
    assert other.poll() is None
    other.send_signal(signal.SIGTERM)
