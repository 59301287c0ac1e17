"""kill -9 of ``fleetpush agent`` (issue 11, item 1), with real processes on 127.0.0.1.

Before issue 11 the app of a SIGKILLed agent lived on and kept its port; the
next agent's app crash-looped on "address already in use" while the health
command was answered by the orphan, so a version that never ran was
committed. Now the agent records its child (pid, /proc start time, process
group) and a starting agent stops a leftover child first; and a health pass
counts only while the agent's own child is alive and has lasted
``health_interval``, so a stranger on the port never vouches for a child
that dies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from fleet_helpers import read_status
from fleetpush.client.child_record import GUARD_SOURCE, proc_start_time
from fleetpush.client.layout import StateLayout
from fp_devices import DeviceDir
from fp_releaser import publish_and_approve, push, releaser
from fp_trees import app_release, write_noise

FLEETPUSH = str(Path(sys.executable).with_name("fleetpush"))
BIG = 12 * 1024 * 1024
#: the first agent downloads slowly (about 8 s for BIG), so it is killed mid-download.
SLOW_RATE = 1_500_000

HEALTH_SOURCE = "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HttpAgentDevice(DeviceDir):
    """dev-1 running tests/apps/http_app on ``app_port`` under a real ``fleetpush agent``."""

    def __init__(self, tmp_path: Path, port: int, app_port: int, **settings: object) -> None:
        self.app_port = app_port
        health = [sys.executable, "-c", HEALTH_SOURCE, f"http://127.0.0.1:{app_port}/health"]
        defaults: dict[str, object] = dict(
            trial_seconds=30,
            health_command=health,
            health_interval=3.0,
            restart_backoff_initial=0.1,
            restart_backoff_max=0.5,
            stop_timeout=3,
            status_interval=1,
        )
        v1 = app_release(tmp_path / "v1", "http_app", "1.0.0")
        super().__init__(tmp_path, port, "http_app", "agent.log", defaults, settings, v1=v1)
        self.procs: list[trio.Process] = []

    async def start(self) -> trio.Process:
        with self.log.open("ab") as out:
            proc = await trio.lowlevel.open_process(
                [
                    FLEETPUSH,
                    "-v",
                    "agent",
                    "--config",
                    str(self.toml),
                    "--",
                    sys.executable,
                    str(self.app_root / "app.py"),
                    str(self.status),
                    str(self.app_port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.root),
            )
        self.procs.append(proc)
        return proc

    async def stop_all(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    def app_pids(self) -> list[int]:
        """Live (not zombie) processes running this device's app.py (not the agents)."""
        app = str(self.app_root / "app.py").encode()
        return [pid for pid, argv in live_processes() if argv[1:2] == [app]]


def live_processes() -> list[tuple[int, list[bytes]]]:
    """(pid, argv) of every live, not zombie, process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc_start_time(int(entry.name)) is not None:
            found.append((int(entry.name), argv))
    return sorted(found)


def guard_of(app_pid: int) -> int:
    """The pid of the parent-death guard watching ``app_pid`` (client/child_record.py)."""
    (pid,) = [
        pid
        for pid, argv in live_processes()
        if GUARD_SOURCE.encode() in argv and str(app_pid).encode() in argv
    ]
    return pid


async def http_get(port: int, path: str = "/") -> str:
    """The body of ``GET path`` from 127.0.0.1:port (whoever answers there)."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while more := await stream.receive_some(4096):
                data += more
    return data.partition(b"\r\n\r\n")[2].decode().strip()


def status_json(dev: DeviceDir) -> dict[str, object]:
    out = subprocess.run(
        [FLEETPUSH, "status", "--offline", "--json", "--config", str(dev.toml)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    doc = json.loads(out.stdout)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture
def agent_log(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    log = tmp_path / "device" / "agent.log"
    if log.exists():
        print(log.read_text()[-8000:])


#: who stops the app of the killed agent: its parent-death guard, or (the guard
#: killed too, as a kill -9 of the agent's session or a missing python would) the
#: next agent, from the child record in the state dir.
STOPPED_BY = {
    "guard": "is gone (or now another process); nothing to stop",
    "record": "stopped the app left by a previous agent",
}


@pytest.mark.slow
@pytest.mark.parametrize("stopper", list(STOPPED_BY))
async def test_kill9_mid_download_leaves_one_app_and_one_version(
    tmp_path: Path, agent_log: None, stopper: str
) -> None:
    app_port = _free_port()
    with trio.fail_after(120):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            v2 = app_release(tmp_path, "http_app", "2.0.0")
            write_noise(v2 / "big.bin", BIG, b"kill9")
            await publish_and_approve(handle, tmp_path / "data", v2, "2.0.0")
            dev = HttpAgentDevice(tmp_path, handle.port, app_port, max_download_rate=SLOW_RATE)
            layout = StateLayout.of(dev.state_dir)
            try:
                first = await dev.start()
                _, _, old_pid = await read_status(dev.status, "1.0.0")
                assert await http_get(app_port) == f"1.0.0 {old_pid}"
                await push(handle, "2.0.0")
                big = layout.staged_files("2.0.0") / "big.bin"
                with trio.fail_after(30):
                    while not (big.exists() and big.stat().st_blocks * 512 > BIG // 8):
                        await trio.sleep(0.05)
                guard = guard_of(old_pid)
                if stopper == "record":
                    os.kill(guard, signal.SIGKILL)
                first.kill()  # SIGKILL: the agent cannot clean anything up
                await first.wait()
                assert not layout.staged_marker("2.0.0").exists(), "killed after the download"

                # The second agent downloads at full speed (the rest of the push).
                dev.toml.write_text(
                    dev.toml.read_text().replace(f"max_download_rate = {SLOW_RATE}", "")
                )
                await dev.start()
                s = await dev.wait_state(
                    lambda s: s.installed_version == "2.0.0" and s.trial is None, timeout=60
                )
                assert not s.is_bad("2.0.0")
                _, _, new_pid = await read_status(dev.status, "2.0.0")
                # The app's own answer, the state and `fleetpush status` agree on 2.0.0 ...
                assert await http_get(app_port) == f"2.0.0 {new_pid}"
                doc = status_json(dev)
                assert (doc["installed"], doc["trial"]) == ("2.0.0", None)
                # ... and the app the killed agent left behind was stopped: one app alive.
                assert proc_start_time(old_pid) is None
                assert dev.app_pids() == [new_pid]
                assert STOPPED_BY[stopper] in dev.log.read_text()
                assert proc_start_time(guard) is None
            finally:
                await dev.stop_all()
            assert dev.app_pids() == []
            assert not layout.child_record.exists()


async def _stranger(port: int, *, task_status: trio.TaskStatus[None]) -> None:
    """Answers 200 to any request on ``port``: not the device's app."""

    async def answer(stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            await stream.receive_some(4096)
            await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nstranger\n")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(answer, listeners)


@pytest.mark.slow
async def test_a_stranger_answering_health_never_commits_a_crash_looping_child(
    tmp_path: Path, agent_log: None
) -> None:
    app_port = _free_port()
    with trio.fail_after(90):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            # 2.0.0 takes half a second before it binds (a web framework
            # starting), then dies on "address already in use".
            v2 = app_release(tmp_path, "http_app", "2.0.0", "slowstart")
            await publish_and_approve(handle, tmp_path / "data", v2, "2.0.0")
            dev = HttpAgentDevice(tmp_path, handle.port, app_port)
            async with trio.open_nursery() as nursery:
                await nursery.start(_stranger, app_port)
                assert await http_get(app_port, "/health") == "stranger"
                try:
                    await dev.start()
                    with trio.fail_after(20):  # the releaser knows dev-1 once it connected
                        while ": connected" not in dev.log.read_text():
                            await trio.sleep(0.05)
                    await push(handle, "2.0.0")
                    s = await dev.wait_state(
                        lambda s: s.is_bad("2.0.0") and s.trial is None, timeout=30
                    )
                    assert s.installed_version == "1.0.0"
                    # Rolled back because its own child died, never committed on the
                    # stranger's word.
                    assert "exited" in json.dumps(s.last_result), s.last_result
                    # Gone, the stranger frees the port for the device's own 1.0.0.
                    nursery.cancel_scope.cancel()
                finally:
                    if not nursery.cancel_scope.cancel_called:
                        await dev.stop_all()
            try:
                _, _, pid = await read_status(dev.status, "1.0.0")
                assert await http_get(app_port) == f"1.0.0 {pid}"
                assert status_json(dev)["installed"] == "1.0.0"
            finally:
                await dev.stop_all()
            assert dev.app_pids() == []
