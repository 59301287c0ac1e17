"""`fleetpush demo`: the whole story on one machine, in a temporary workspace.

1. keys (release, operator, one per device) and a releaser on 127.0.0.1,
   serving TLS with the certificate it makes itself; its printed pin goes
   into console.toml and every agent.toml (as an operator would copy it);
2. v1.0.0 of the example app published and approved; N supervised devices
   (``fleetpush agent`` processes) running it;
3. v1.1.0, which adds a dependency (a wheel shipped in the signed release;
   each device builds the release's Python env offline before it stops the
   app), pushed as a forced update with restart; every step shown from the
   releaser's event stream; then every device's *app* is asked its version
   and its dependency;
4. a broken v1.2.0 (crashes on start) pushed; every device rolls back to
   v1.1.0 by itself and reports the failure; the apps are asked again;
5. a summary. Any deviation raises :class:`DemoError` (exit code 1) saying
   what went wrong. Every child process is stopped on the way out, always.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.markup import escape

from fleetpush.client.session import load_or_create_device_key
from fleetpush.net.tls import ClientTls
from fleetpush.operator import OperatorClient, connect, single_exception
from fleetpush.protocol import FleetpushError
from fleetpush.protocol.keys import private_key_from_pem, public_bytes
from fleetpush.protocol.messages import Event

from .app import APP, AppQueryError, ask_version, build_release
from .processes import FLEETPUSH, Children
from .roots import make_and_publish_root
from .wheel import write_wheel

PHASE_TIMEOUT = 45.0
DOWNLOAD_RATE = 24 * 1024 * 1024  # bytes/s per device: slow enough to see progress
STATE_WORDS = {
    "checking": "checking",
    "downloading": "downloading",
    "verifying": "verifying every file against the signed manifest",
    "staged": "staged",
    # The apply starts; an agent then reports each of its steps (issue 12).
    "applying": "applying",
    "restarting": "restarting the app",
    # The agent's steps, in order (PROTOCOL.md §7.6; issue 12).
    "preparing_env": "preparing the release's Python environment (offline)",
    "backing_up": "backing up code and data",
    "stopping": "stopping the app",
    "installing": "installing the new files",
    "migrating": "migrating the data",
    "starting": "starting the app",
    "rolling_back": "ROLLING BACK code, environment and data",
    "trial": "new version on trial",
    "committed": "committed",
    "rolled_back": "ROLLED BACK",
    "failed": "FAILED",
    "deferred": "deferred",
}


class DemoError(FleetpushError):
    """The demo deviated from the story; the message says how."""


@attrs.define
class Device:
    name: str
    root: Path
    port_file: Path
    agent: Any = None
    states: list[tuple[str, str, str | None]] = attrs.field(factory=list)
    last_pct: int = -1
    app_state: str | None = None
    app_pid: int | None = None


class Demo:
    def __init__(self, workspace: Path, devices: int, console: Console) -> None:
        self.ws = workspace
        self.n = devices
        self.out = console
        self.t0 = time.monotonic()
        self.devices: dict[str, Device] = {}
        self.changed = trio.Event()
        self.children = Children(workspace / "logs")
        self.host = "127.0.0.1"
        self.port = 0
        self.pin = ""  # the releaser certificate's SHA-256, as it printed it
        self.op_key: Ed25519PrivateKey | None = None
        self.rel_key: Ed25519PrivateKey | None = None
        #: the offline root key, and the release key root v2 rotates to (step 5)
        self.root_key: Ed25519PrivateKey | None = None
        self.next_rel_key: Ed25519PrivateKey | None = None
        self.root_file = workspace / "root-1.json"
        self.problems: list[str] = []

    # --- output ----------------------------------------------------------------------

    def say(self, text: str, style: str = "") -> None:
        stamp = f"[dim]{time.monotonic() - self.t0:5.1f}s[/]"
        self.out.print(f"{stamp} {text}", style=style or None, highlight=False)

    def step(self, text: str) -> None:
        self.out.print()
        self.out.print(f"[bold cyan]== {text}[/]", highlight=False)

    # --- events ------------------------------------------------------------------------

    def on_event(self, e: Event) -> None:
        d = self.devices.get(e.device_id or "")
        if d is None:
            return
        data = e.data
        if e.kind == "progress":
            state = str(data.get("state", ""))
            version = str(data.get("version") or "")
            error = data.get("error")
            d.states.append((state, version, error))
            if state == "downloading":
                done, total = int(data.get("bytes_done") or 0), int(data.get("bytes_total") or 0)
                pct = 100 * done // total if total else 0
                step = pct // 25 * 25
                if step > d.last_pct:
                    d.last_pct = step
                    bar = "#" * (step // 5) + "." * (20 - step // 5)
                    self.say(
                        f"{d.name}  downloading {version:<6} " + escape(f"[{bar}]") + f" {pct:3d}%"
                    )
            elif state in STATE_WORDS and state != "checking":
                d.last_pct = -1
                style = {"committed": "green", "rolled_back": "yellow", "failed": "red"}.get(
                    state, ""
                )
                tail = f": {error}" if error else ""
                # A rollback names the version the device runs again (PROTOCOL §7.6).
                to = "to " if state == "rolled_back" else ""
                self.say(f"{d.name}  {STATE_WORDS[state]} {to}{version}{tail}", style)
        elif e.kind == "app_status":
            state = str(data.get("state"))
            pid = data.get("pid") if isinstance(data.get("pid"), int) else None
            if (state, pid) != (d.app_state, d.app_pid):
                d.app_state, d.app_pid = state, pid
                detail = f" pid {pid}" if pid and state != "stopped" else ""
                if data.get("exit_code") is not None and state in ("stopped", "error"):
                    detail += f" (exit code {data['exit_code']})"
                self.say(f"{d.name}  app {state}{detail}", "dim")
        elif e.kind == "connected":
            self.say(f"{d.name}  connected to the releaser", "dim")
        self.changed.set()
        self.changed = trio.Event()

    async def watch(self, op: OperatorClient) -> None:
        async for event in op.watch():
            self.on_event(event)

    async def wait_until(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        with trio.move_on_after(timeout):
            while not done():
                self.check_agents()
                with trio.move_on_after(0.25):
                    await self.changed.wait()
            return
        raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")

    def check_agents(self) -> None:
        for d in self.devices.values():
            if d.agent is not None and not d.agent.alive():
                raise DemoError(
                    f"the agent of {d.name} exited with {d.agent.popen.returncode}:\n"
                    + d.agent.log_tail()
                )

    # --- steps ---------------------------------------------------------------------------

    def keys(self) -> None:
        from fleetpush.cli.keys_cmd import write_keypair

        keys = self.ws / "keys"
        keys.mkdir(parents=True)
        for name in ("release", "operator", "root", "release-2"):
            write_keypair(keys / f"{name}.key")
        rel_key = private_key_from_pem((keys / "release.key").read_bytes())
        op_key = private_key_from_pem((keys / "operator.key").read_bytes())
        self.rel_key, self.op_key = rel_key, op_key
        self.root_key = private_key_from_pem((keys / "root.key").read_bytes())
        self.next_rel_key = private_key_from_pem((keys / "release-2.key").read_bytes())
        for i in range(1, self.n + 1):
            name = f"device-{i}"
            root = self.ws / "devices" / name
            (root / "state").mkdir(parents=True)
            load_or_create_device_key(root / "state")
            self.devices[name] = Device(name, root, root / "app.port")
        self.say(
            f"release key {public_bytes(rel_key).hex()[:16]}..., operator key "
            f"{public_bytes(op_key).hex()[:16]}..., {self.n} device keys"
        )

    def start_releaser(self) -> None:
        assert self.op_key is not None and self.rel_key is not None
        assert self.root_key is not None
        # Root v1 (README.md, "Root of trust"): the devices are provisioned with it.
        self.root_file = make_and_publish_root(self.ws, 1, self.root_key, self.rel_key)
        self.say(f"root v1 published: root key {public_bytes(self.root_key).hex()[:16]}...")
        child, self.host, self.port = self.children.start_server(
            self.ws / "releaser",
            operator_keys=[public_bytes(self.op_key).hex()],
            insecure=False,
            release_keys=[public_bytes(self.rel_key).hex()],
        )
        assert child.tls_pin is not None  # start_server checked it printed one
        self.pin = child.tls_pin
        self.say(f"releaser (pid {child.pid}) listening on {self.host}:{self.port} (TLS)")
        self.say(f"tls pin {self.pin[:16]}... (console.toml and every agent.toml pin it)")
        (self.ws / "console.toml").write_text(
            f'server = "{self.host}:{self.port}"\n'
            f'tls_pin = "{self.pin}"\n'
            'operator_key = "keys/operator.key"\n'
            'operator_name = "demo"\n'
            'data_dir = "releaser"\n'
            'release_keys = ["keys/release.key"]\n'
        )

    def publish(
        self, version: str, *, broken: bool = False, notes: str = "", deps: bool = False
    ) -> None:
        """Publish ``version``; with ``deps`` it carries a Python env with demo_units."""
        from fleetpush.server import publish_release
        from fleetpush.server.pyenv_publish import resolve_env

        src = build_release(self.ws / "src" / version, version, broken=broken)
        assert self.rel_key is not None
        env = None
        if deps:
            wheelhouse = self.ws / "wheelhouse"
            write_wheel(wheelhouse)
            env = resolve_env(
                self.ws / "env-work" / version, wheelhouse=wheelhouse, imports=["demo_units"]
            )
        info = publish_release(
            self.ws / "releaser",
            src,
            app=APP,
            version=version,
            notes=notes,
            restart=True,
            signing_keys=[self.rel_key],
            operator="demo",
            env=env,
        )
        extra = " with a Python env: + demo_units 1.0 (wheel signed in the release)" if deps else ""
        self.say(
            f"published {APP} {info.version} (sequence {info.sequence}, {info.status}){extra}"
        )

    def start_devices(self) -> None:
        assert self.rel_key is not None
        v1 = self.ws / "src" / "1.0.0"
        for d in self.devices.values():
            shutil.copytree(v1, d.root / "app")
            # {python}: the release's env interpreter once it has one (issue 12)
            command = ["{python}", "app.py", "--port-file", str(d.port_file)]
            (d.root / "agent.toml").write_text(
                f'server = "{self.host}:{self.port}"\n'
                f'tls_pin = "{self.pin}"\n'
                f'app = "{APP}"\n'
                'version = "1.0.0"\n'
                # push-first: the devices act on the releaser's pushes; no polling
                "auto_check = false\n"
                f'device_id = "{d.name}"\n'
                'group = "demo"\n'
                'state_dir = "state"\n'
                'app_root = "app"\n'
                f'root = "{self.root_file}"\n'
                f"max_download_rate = {DOWNLOAD_RATE}\n"
                "confirm_after = 2.0\n"
                "trial_seconds = 15.0\n"
                "max_attempts = 2\n"
                "backoff_initial = 0.2\n"
                "backoff_max = 2.0\n"
                "restart_backoff_initial = 0.2\n"
                "restart_backoff_max = 1.0\n"
                "stop_timeout = 5.0\n"
                "status_interval = 5.0\n"
                f"command = {_toml_list(command)}\n"
            )
            d.agent = self.children.start(
                f"agent-{d.name}",
                [*FLEETPUSH, "agent", "--config", str(d.root / "agent.toml")],
                cwd=d.root,
                env=_child_env(),
            )
        self.say(
            f"started {self.n} agents: "
            + ", ".join(f"{d.name} (pid {d.agent.pid})" for d in self.devices.values())
        )

    async def ask_apps(
        self,
        want: str,
        *,
        old_pids: dict[str, int] | None = None,
        want_deps: dict[str, str] | None = None,
    ) -> dict[str, int]:
        """Ask every device's app for its version; all must answer ``want``."""
        pids: dict[str, int] = {}
        for d in self.devices.values():
            answer: dict[str, Any] | None = None
            last_error = ""
            deadline = trio.current_time() + 15.0
            while trio.current_time() < deadline:
                try:
                    answer = await trio.to_thread.run_sync(ask_version, d.port_file)
                except AppQueryError as e:
                    last_error = str(e)
                    answer = None
                if answer is not None and answer.get("version") == want:
                    break
                await trio.sleep(0.2)
            if answer is None:
                raise DemoError(f"the app on {d.name} does not answer: {last_error}")
            if answer.get("version") != want:
                raise DemoError(
                    f"the app on {d.name} answers version {answer.get('version')}, not {want}"
                )
            pid = int(answer.get("pid", 0))
            moved = ""
            if old_pids is not None:
                moved = " (new process)" if old_pids.get(d.name) != pid else " (same process!)"
                if old_pids.get(d.name) == pid:
                    raise DemoError(f"the app on {d.name} was not restarted (pid {pid})")
            deps = answer.get("deps") or {}
            if want_deps and deps != want_deps:
                raise DemoError(
                    f"the app on {d.name} runs with {deps or 'no deps'}, not {want_deps}"
                )
            shown = " deps " + ", ".join(f"{k} {v}" for k, v in deps.items()) if deps else ""
            self.say(
                f"{d.name}  app itself answers: {answer.get('app')} version "
                f"[bold]{answer.get('version')}[/] pid {pid}{moved}{shown}",
                "green",
            )
            pids[d.name] = pid
        return pids

    def mark(self) -> dict[str, int]:
        """Where each device's progress history stands now (before a push)."""
        return {name: len(d.states) for name, d in self.devices.items()}

    def since(self, mark: dict[str, int]) -> dict[str, list[tuple[str, str, str | None]]]:
        return {name: d.states[mark.get(name, 0) :] for name, d in self.devices.items()}

    async def wait_outcome(
        self, mark: dict[str, int], good: str, version: str | None, bad: tuple[str, ...]
    ) -> None:
        """Wait until every device reported ``good`` (for ``version``) since ``mark``.

        Any ``bad`` state reported meanwhile is a deviation.
        """

        def done() -> bool:
            for name, states in self.since(mark).items():
                for s, v, err in states:
                    if s in bad:
                        raise DemoError(f"{name} reported {s} {v}" + (f": {err}" if err else ""))
            return all(
                any(s == good and (version is None or v == version) for s, v, _ in states)
                for states in self.since(mark).values()
            )

        what = f"every device to report {good}" + (f" {version}" if version else "")
        await self.wait_until(what, done, PHASE_TIMEOUT)


def _toml_list(items: list[str]) -> str:
    return (
        "["
        + ", ".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items)
        + "]"
    )


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def _story(demo: Demo) -> dict[str, Any]:
    demo.step("1. keys and the releaser")
    demo.keys()
    demo.start_releaser()
    demo.step(f"2. {APP} 1.0.0 on {demo.n} supervised devices")
    demo.publish("1.0.0", notes="first release")
    assert demo.op_key is not None
    tls = ClientTls(pin_sha256=demo.pin)
    async with (
        connect((demo.host, demo.port), demo.op_key, name="demo", tls=tls) as op,
        connect((demo.host, demo.port), demo.op_key, name="demo-watch", tls=tls) as watcher,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(demo.watch, watcher)
        await trio.sleep(0.1)
        await op.approve(APP, "1.0.0")
        demo.say(f"approved {APP} 1.0.0")
        demo.start_devices()

        async def all_connected() -> bool:
            devices = await op.list_devices(app=APP)
            return sum(1 for d in devices if d.connected) >= demo.n

        with trio.move_on_after(PHASE_TIMEOUT) as scope:
            while not await all_connected():
                demo.check_agents()
                await trio.sleep(0.2)
        if scope.cancelled_caught:
            raise DemoError("the devices did not all connect to the releaser")
        v1_pids = await demo.ask_apps("1.0.0")

        demo.step("3. push 1.1.0 (adds a dependency) as a forced update with restart")
        demo.publish("1.1.0", notes="faster sampling; needs demo_units", deps=True)
        await op.approve(APP, "1.1.0")
        demo.say(f"approved {APP} 1.1.0")
        t_push = time.monotonic()
        mark = demo.mark()
        result = await op.push(app=APP, version="1.1.0", mode="force", restart=True, all=True)
        demo.say(
            f"pushed 1.1.0 to {len(result.targets)} devices "
            f"({len(result.sent)} online now, push {result.push_id})"
        )
        await demo.wait_outcome(mark, "committed", "1.1.0", ("failed", "rolled_back"))
        t_update = time.monotonic() - t_push
        v11_pids = await demo.ask_apps(
            "1.1.0", old_pids=v1_pids, want_deps={"demo_units": "1.0"}
        )

        demo.step("4. push a broken 1.2.0 (crashes on start)")
        demo.publish("1.2.0", broken=True, notes="new config schema (broken)", deps=True)
        await op.approve(APP, "1.2.0")
        demo.say(f"approved {APP} 1.2.0")
        t_push = time.monotonic()
        mark = demo.mark()
        result = await op.push(app=APP, version="1.2.0", mode="force", restart=True, all=True)
        demo.say(f"pushed 1.2.0 to {len(result.targets)} devices (push {result.push_id})")
        await demo.wait_outcome(mark, "rolled_back", None, ("committed",))
        failures = {
            name: next((err for s, _, err in reversed(states) if err), None)
            for name, states in demo.since(mark).items()
        }
        missing = [name for name, err in failures.items() if not err]
        if missing:
            raise DemoError(f"no failure reason reported by {', '.join(missing)}")
        t_rollback = time.monotonic() - t_push
        rolled_pids = await demo.ask_apps(
            "1.1.0", old_pids=v11_pids, want_deps={"demo_units": "1.0"}
        )
        await op.set_release_status(APP, "1.2.0", "revoked")
        demo.say(f"revoked {APP} 1.2.0: it will never be offered or pushed again")

        demo.step("5. rotate the release key (root v2, signed offline), touching no device")
        t_rotate = await _rotate(demo, op, rolled_pids)

        devices = await op.list_devices(app=APP)
        nursery.cancel_scope.cancel()
    return {
        "devices": devices,
        "update_seconds": t_update,
        "rollback_seconds": t_rollback,
        "rotate_seconds": t_rotate,
        "failures": failures,
    }


async def _rotate(demo: Demo, op: OperatorClient, old_pids: dict[str, int]) -> float:
    """Root v2 swaps the release key; 1.3.0 signed by the new one reaches every device."""
    assert demo.root_key is not None and demo.next_rel_key is not None
    make_and_publish_root(demo.ws, 2, demo.root_key, demo.next_rel_key)
    demo.say(
        f"root v2 published: release key {public_bytes(demo.next_rel_key).hex()[:16]}... "
        "replaces the old one"
    )
    try:
        demo.publish("1.3.0", notes="signed by the old key", deps=True)
    except FleetpushError as e:
        demo.say(f"the old release key is refused now: {e}")
    else:
        raise DemoError("a release signed by the removed key was accepted")
    demo.rel_key = demo.next_rel_key
    console = demo.ws / "console.toml"  # --keep: release publish signs with the new key
    console.write_text(console.read_text().replace("keys/release.key", "keys/release-2.key"))
    demo.publish("1.3.0", notes="signed by the new release key", deps=True)
    await op.approve(APP, "1.3.0")
    t_push = time.monotonic()
    mark = demo.mark()
    result = await op.push(app=APP, version="1.3.0", mode="force", restart=True, all=True)
    demo.say(f"pushed 1.3.0 to {len(result.targets)} devices; each walks to root v2 first")
    await demo.wait_outcome(mark, "committed", "1.3.0", ("failed", "rolled_back"))
    await demo.ask_apps("1.3.0", old_pids=old_pids, want_deps={"demo_units": "1.0"})
    return time.monotonic() - t_push


def run_demo(devices: int = 3, keep: Path | None = None, console: Console | None = None) -> int:
    """Run the demo; returns 0, or raises :class:`DemoError` with what went wrong."""
    out = console or Console(highlight=False, soft_wrap=True)
    if keep is not None:
        keep = keep.resolve()
        if keep.exists() and any(keep.iterdir()):
            raise DemoError(f"--keep {keep}: the directory is not empty")
        keep.mkdir(parents=True, exist_ok=True)
        workspace = keep
    else:
        workspace = Path(tempfile.mkdtemp(prefix="fleetpush-demo-"))
    demo = Demo(workspace, devices, out)
    out.print(f"[bold]fleetpush demo[/]: {devices} devices, workspace {workspace}")
    try:
        with demo.children:
            try:
                summary = trio.run(_story, demo)
            except BaseExceptionGroup as group:
                single = single_exception(group)
                if single is None:
                    raise
                raise single from None
            demo.step("6. summary")
            for d in summary["devices"]:
                out.print(
                    f"  {d.device_id:<10} version {d.version:<6} state {d.state:<12} "
                    f"last result: {_result_text(d.last_result)}",
                    highlight=False,
                )
            out.print(
                f"  update to 1.1.0 on all devices: {summary['update_seconds']:.1f}s "
                f"(download, apply, restart, trial, commit)",
                highlight=False,
            )
            out.print(
                f"  broken 1.2.0 rolled back on all devices: {summary['rollback_seconds']:.1f}s",
                highlight=False,
            )
            out.print(
                f"  1.3.0 under the rotated release key on all devices: "
                f"{summary['rotate_seconds']:.1f}s",
                highlight=False,
            )
            reasons = {r for r in summary["failures"].values() if r}
            if reasons:
                out.print(
                    f"  failure reported to the operator: {sorted(reasons)[0]}", highlight=False
                )
            out.print(f"  total {time.monotonic() - demo.t0:.1f}s", highlight=False)
        out.print("[bold green]demo passed[/]")
        if keep is not None:
            _explain_keep(out, workspace)
        return 0
    finally:
        if keep is None:
            shutil.rmtree(workspace, ignore_errors=True)


def _result_text(result: dict[str, Any] | None) -> str:
    """A ``last_result`` object (specs/PROTOCOL.md §7.9) as ``STATE VERSION[: ERROR]``."""
    if not result:
        return "-"
    text = f"{result.get('state')} {result.get('version') or ''}".strip()
    return text + (f": {result['error']}" if result.get("error") else "")


def _explain_keep(out: Console, ws: Path) -> None:
    cfg = ws / "console.toml"
    out.print()
    out.print(f"The workspace is kept in {ws}. To explore it, start the releaser again")
    out.print("(it reuses its certificate, so the tls_pin in the configs stays valid):")
    out.print(f"  fleetpush server --data-dir {ws / 'releaser'} --listen 127.0.0.1:7878 \\")
    out.print(f"      --operator-key $(cat {ws / 'keys/operator.key.pub'}) &")
    out.print(f"  sed -i 's/^server = .*/server = \"127.0.0.1:7878\"/' {cfg}")
    out.print(f"  fleetpush devices --config {cfg}")
    out.print(f"  fleetpush release list --config {cfg}")
    out.print(f"  fleetpush watch --config {cfg}")
    out.print(f"  fleetpush agent --config {ws / 'devices/device-1/agent.toml'}   # a device again")
    out.print(f"Logs of every process: {ws / 'logs'}")
