"""A real ``fleetpush agent`` process over a test device, and device commands beside it.

Used by the tests of the device's one owner and its control socket (issue 11):
the agent is the installed ``fleetpush`` script in a subprocess; the commands
run the same script (``cli``), or its entry point in a worker thread
(``cli_inline``) where a test runs one a hundred times.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import trio
from fp_devices import DeviceDir

FLEETPUSH = str(Path(sys.executable).with_name("fleetpush"))

#: Agent settings short enough for tests (a test's own settings override them).
AGENT_DEFAULTS: dict[str, object] = dict(
    trial_seconds=10,
    confirm_after=1.0,
    restart_backoff_initial=0.1,
    restart_backoff_max=0.5,
    stop_timeout=3,
    status_interval=1,
)


@attrs.frozen
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.out)
        assert isinstance(doc, dict)
        return doc


class AgentDevice(DeviceDir):
    """dev-1 with the plain app (``PORT VERSION PID`` in ``status``), run by an agent."""

    def __init__(self, tmp_path: Path, port: int, **settings: object) -> None:
        super().__init__(tmp_path, port, "plain_app", "agent.log", AGENT_DEFAULTS, settings)
        self.procs: list[trio.Process] = []

    def app_command(self) -> list[str]:
        return [sys.executable, str(self.app_root / "app.py"), str(self.status)]

    async def start_agent(self, command: list[str] | None = None) -> trio.Process:
        with self.log.open("ab") as out:
            proc = await trio.lowlevel.open_process(
                [FLEETPUSH, "-v", "agent", "--config", str(self.toml), "--"]
                + (command or self.app_command()),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.root),
            )
        self.procs.append(proc)
        return proc

    async def stop_agents(self) -> list[int | None]:
        codes = []
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            codes.append(proc.returncode)
        return codes

    async def cli(self, *args: str, timeout: float = 60.0) -> Ran:
        """``fleetpush ARGS --config agent.toml`` in a subprocess."""
        done = await trio.run_process(
            [FLEETPUSH, *args, "--config", str(self.toml)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(self.root),
        )
        return Ran(done.returncode, done.stdout.decode(), done.stderr.decode())

    async def cli_inline(self, *args: str) -> Ran:
        """The same through ``fleetpush.cli.main.main``, in a worker thread."""
        from fleetpush.cli.main import main

        def run() -> Ran:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([*args, "--config", str(self.toml)])
            return Ran(code, out.getvalue(), err.getvalue())

        return await trio.to_thread.run_sync(run)

    async def wait_owner(self, timeout: float = 20.0) -> dict[str, Any]:
        """The agent's status once its control socket answers and its app runs."""
        from fleetpush.client import local

        with trio.fail_after(timeout):
            while True:
                try:
                    doc = await trio.to_thread.run_sync(
                        lambda: local.status(state_dir=self.state_dir)
                    )
                    if doc.get("app_state") == "running":
                        return doc
                except local.ControlError:
                    pass
                await trio.sleep(0.1)

    def app_pid(self) -> int:
        return int(self.status.read_text().split()[2])
