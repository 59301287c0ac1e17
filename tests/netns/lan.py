"""A LAN of real fleetpush processes in network namespaces, joined by a bridge (issue 18).

Topology (root only; the root namespace's interfaces are never touched):

* namespace ``hub`` holds a Linux bridge with the releaser's address
  (198.18.0.1/15, RFC 2544's benchmarking range) and runs ``fleetpush server``;
* each device has its own namespace, one veth end in it (198.18.1.N) and the
  other enslaved to the bridge: one broadcast domain, the "LAN";
* each device runs a real ``fleetpush agent`` with ``p2p = true``.

Two devices are hostile: ``liar`` installs the release from the releaser like
any device, then its installed files are overwritten on disk (0xFF) while its
agent keeps serving them: a device whose storage went bad after verification,
with no test hook in production code. ``mute`` installs the release too, then
it announces (``p2p_host``) a second address of its namespace where, once it
holds the release, a plain socket listener accepts and never answers; its
agent stays connected, so the releaser hands it out like any online holder.
Both get the release in a first deployment; the measured deployment then rolls
the release out to every other device in doubling phases (1, 3, 7, ...).

Nearness: every device has its own address as the releaser sees it (no NAT on
this bridge), so they are "near" through the operator-set site, ``group =
"lan"`` (select_peers rank 1, specs/PROTOCOL.md §7.11).

Cleanup always happens (:class:`Lan` is a context manager): every process
started is killed by process group, and deleting the namespaces destroys the
bridge and every veth. Names carry the pid and a counter, so runs never clash,
and a new run deletes the namespaces of a run that was killed (its pid gone).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

HUB_ADDR = "198.18.0.1"
PREFIX = 15
SERVER_PORT = 7878
METRICS_PORT = 9100
P2P_PORT = 7879
APP = "demo"
VERSION = "2.0.0"
FLEETPUSH = [sys.executable, "-m", "fleetpush.cli.main"]
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why namespaces and bridges cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "the LAN tests need root (ip netns, veth, bridge)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    name = f"fpl-probe-{os.getpid()}"
    try:
        made = _ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return f"ip netns add failed: {made.stderr.strip()}"
        br = _ip("-n", name, "link", "add", "br0", "type", "bridge", check=False)
        if br.returncode != 0:
            return f"cannot create a bridge: {br.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run ip: {e}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


def sweep_orphans() -> None:
    """Delete namespaces left by a run that was killed (its pid, in the name, is gone)."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ", 1)[0]
        m = re.fullmatch(r"fpl(\d+)x\d+-(hub|d\d+)", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _ip("netns", "del", name, check=False)


def device_addr(i: int) -> str:
    """198.18.1.1 ... 198.18.(1 + i // 250).(1 + i % 250): room for thousands."""
    return f"198.18.{1 + i // 250}.{1 + i % 250}"


def silent_addr(i: int) -> str:
    """A second address of device ``i`` (same /15): where ``mute`` says it serves."""
    return f"198.19.{1 + i // 250}.{1 + i % 250}"


class Lan:
    """The hub namespace with its bridge, device namespaces, and every process started."""

    def __init__(self) -> None:
        self.tag = f"fpl{os.getpid()}x{next(_counter)}"
        self.hub = f"{self.tag}-hub"
        self.devices: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Lan:
        sweep_orphans()
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "addr", "add", f"{HUB_ADDR}/{PREFIX}", "dev", "br0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def add_device(self, i: int) -> str:
        """A namespace for device ``i`` on the bridge, at :func:`device_addr`; its name."""
        ns = f"{self.tag}-d{i}"
        self.devices.append(ns)  # before it exists: cleanup deletes what was made
        _ip("netns", "add", ns)
        _ip(
            "link", "add", f"v{i}", "netns", self.hub,
            "type", "veth", "peer", "name", "eth0", "netns", ns,
        )  # fmt: skip
        _ip("-n", self.hub, "link", "set", f"v{i}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{device_addr(i)}/{PREFIX}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", "eth0", "up")
        return ns

    def popen(self, ns: str, argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in namespace ``ns`` (its own process group), output to ``log``."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **kw,
            )
        self.procs.append(proc)
        return proc

    def run(
        self, ns: str, argv: list[str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout
        )

    def bridge_tx_bytes(self) -> int:
        """Bytes the hub's own stack sent onto the bridge: the releaser's wire egress."""
        out = self.run(self.hub, ["cat", "/sys/class/net/br0/statistics/tx_bytes"])
        return int(out.stdout)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def cleanup(self) -> None:
        for proc in self.procs:
            self.kill(proc)
        self.procs.clear()
        for ns in [*self.devices, self.hub]:
            _ip("netns", "del", ns, check=False)
        self.devices.clear()


# --- the fleet ---------------------------------------------------------------------------


def _toml(settings: dict[str, object]) -> str:
    lines = []
    for k, v in settings.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, int | float):
            lines.append(f"{k} = {v}")
        elif isinstance(v, list):
            lines.append(f"{k} = {json.dumps([str(x) for x in v])}")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    return "\n".join(lines) + "\n"


def make_release(src: Path, size: int) -> None:
    """Two files of pseudo-random bytes, ``size`` in all."""
    import random

    rng = random.Random(18)
    src.mkdir(parents=True)
    half = size // 2
    for name, n in (("a.bin", half), ("b.bin", size - half)):
        with (src / name).open("wb") as f:
            left = n
            while left:
                step = min(left, 1 << 20)
                f.write(rng.randbytes(step))
                left -= step


class Fleet:
    """The releaser and the agents of one run, in ``work``."""

    def __init__(
        self,
        lan: Lan,
        work: Path,
        devices: int,
        size: int,
        chunk: int,
        *,
        names: list[str] | None = None,
        settings: dict[str, dict[str, object]] | None = None,
    ) -> None:
        self.lan = lan
        self.work = work
        self.n = devices
        self.size = size
        self.chunk = chunk
        self.names = names or ["liar", "mute", *(f"dev-{i:03d}" for i in range(1, devices - 1))]
        #: per device: agent.toml settings over the defaults (e.g. p2p = false)
        self.settings = settings or {}
        self.silent = ""
        #: agents killed on purpose (their exit is no failure)
        self.killed: set[str] = set()
        self.ns: dict[str, str] = {}
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.addr: dict[str, str] = {}
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # -- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        from fleetpush.protocol import keys
        from fleetpush.protocol.keys import private_key_from_pem
        from fleetpush.protocol.root import Role, Root, envelope_to_json, sign_root
        from fleetpush.server import publish_release
        from fleetpush.server.releases import ReleaseStore
        from fleetpush.server.roots import publish_root

        from fleetpush.cli.keys_cmd import write_keypair

        k = self.work / "keys"
        k.mkdir()
        for name in ("root", "release", "timestamp", "operator"):
            write_keypair(k / f"{name}.key")
        root_k, rel_k, ts_k, op_k = (
            private_key_from_pem((k / f"{n}.key").read_bytes())
            for n in ("root", "release", "timestamp", "operator")
        )
        ids = {n: keys.keyid(x) for n, x in (("root", root_k), ("rel", rel_k), ("ts", ts_k))}
        root = Root(
            version=1,
            expires=int(time.time()) + 86_400,
            keys={ids[n]: keys.public_bytes(x) for n, x in (("root", root_k), ("rel", rel_k),
                                                           ("ts", ts_k))},
            root=Role(keys=[ids["root"]], threshold=1),
            release=Role(keys=[ids["rel"]], threshold=1),
            # The timestamp role signs peer tokens too (§7.11): without it no peers.
            timestamp=Role(keys=[ids["ts"]], threshold=1),
        )  # fmt: skip
        envelope = sign_root(root.to_bytes(), [root_k])
        self.root_file = self.work / "root-1.json"
        self.root_file.write_bytes(envelope_to_json(envelope))
        self.data = self.work / "releaser"
        self.data.mkdir(mode=0o700)
        publish_root(self.data, envelope, now=time.time())
        self.src = self.work / "src"
        make_release(self.src, self.size)
        publish_release(
            self.data, self.src, app=APP, version=VERSION, restart=True, chunk_size=self.chunk,
            signing_keys=[rel_k], operator="lan", release_keys=[keys.public_bytes(rel_k)],
        )  # fmt: skip
        store = ReleaseStore.open(self.data)
        try:
            store.set_status(APP, VERSION, "pre-released", "lan")
            store.set_status(APP, VERSION, "approved", "lan")
        finally:
            store.close()
        self.console = self.work / "console.toml"
        self.console.write_text(
            _toml(
                {
                    "server": f"{HUB_ADDR}:{SERVER_PORT}",
                    "operator_key": str(k / "operator.key"),
                    "operator_name": "lan",
                    "insecure": True,
                }
            )
        )
        self.server = self.lan.popen(
            self.lan.hub,
            [
                *FLEETPUSH, "server", "--data-dir", str(self.data), "--insecure",
                "--listen", f"{HUB_ADDR}:{SERVER_PORT}",
                "--metrics", f"{HUB_ADDR}:{METRICS_PORT}",
                "--operator-key", keys.public_bytes(op_k).hex(),
                "--release-key", keys.public_bytes(rel_k).hex(),
                "--timestamp-key", str(k / "timestamp.key"),
                "--heartbeat", "5",
            ],
            self.logs / "releaser.log",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self._wait(lambda: self.metrics() is not None, 30, "the releaser to listen")
        for i, name in enumerate(self.names):
            self.ns[name] = self.lan.add_device(i)
            self.addr[name] = device_addr(i)
            if name == "mute":
                self.silent = silent_addr(i)
                _ip("-n", self.ns[name], "addr", "add", f"{self.silent}/{PREFIX}", "dev", "eth0")
            self.start_agent(name)

    def device_dir(self, name: str) -> Path:
        return self.work / "devices" / name

    def start_agent(self, name: str) -> None:
        d = self.device_dir(name)
        (d / "app").mkdir(parents=True, exist_ok=True)
        (d / "app" / "README").write_text("v1\n")
        addr = self.addr[name]
        (d / "agent.toml").write_text(
            _toml(
                {
                    "server": f"{HUB_ADDR}:{SERVER_PORT}",
                    "insecure": True,
                    "app": APP,
                    "version": "1.0.0",
                    "device_id": name,
                    "group": "lan",
                    "state_dir": str(d / "state"),
                    "app_root": str(d / "app"),
                    "root": str(self.root_file),
                    "auto_check": False,
                    "p2p": True,
                    "p2p_listen": f"{addr}:{P2P_PORT}",
                    "p2p_host": self.silent if name == "mute" else addr,
                    "p2p_subnet": f"198.18.0.0/{PREFIX}",
                    "trial_seconds": 1.0,
                    "confirm_after": 0.5,
                    "status_interval": 2.0,
                    "backoff_initial": 0.2,
                    "backoff_max": 2.0,
                    "restart_backoff_initial": 0.2,
                    "restart_backoff_max": 1.0,
                    "stop_timeout": 3.0,
                    "command": ["sleep", "100000"],
                }
                | self.settings.get(name, {})
            )
        )
        self.agents[name] = self.lan.popen(
            self.ns[name],
            [*FLEETPUSH, "agent", "--config", str(d / "agent.toml")],
            self.logs / f"{name}.log",
            cwd=str(d),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    # -- operator and observation ---------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60) -> Any:
        """``fleetpush ARGS --json`` as the operator, from the hub; its JSON."""
        out = self.lan.run(
            self.lan.hub,
            [*FLEETPUSH, *args, "--config", str(self.console), "--json"],
            timeout=timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(f"fleetpush {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def cli_text(self, *args: str) -> str:
        """``fleetpush ARGS`` as the operator, from the hub; its plain output."""
        out = self.lan.run(self.lan.hub, [*FLEETPUSH, *args, "--config", str(self.console)])
        if out.returncode != 0:
            raise RuntimeError(f"fleetpush {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def metrics(self) -> dict[str, float] | None:
        """The releaser's Prometheus figures (name{labels} -> value), or None if down."""
        code = (
            "import sys, urllib.request\n"
            f"sys.stdout.write(urllib.request.urlopen('http://{HUB_ADDR}:{METRICS_PORT}/metrics',"
            " timeout=5).read().decode())\n"
        )
        out = self.lan.run(self.lan.hub, [sys.executable, "-c", code], timeout=30)
        if out.returncode != 0:
            return None
        figures: dict[str, float] = {}
        for line in out.stdout.splitlines():
            if line.startswith("fleetpush_") and " " in line:
                key, _, value = line.rpartition(" ")
                figures[key] = float(value)
        return figures

    def chunk_bytes_served(self) -> int:
        m = self.metrics() or {}
        return int(m.get("fleetpush_chunk_bytes_served_total", 0))

    def installed(self, name: str) -> bool:
        from fleetpush.client.state import load_state

        try:
            s = load_state(self.device_dir(name) / "state")
        except Exception:  # a state file being replaced: ask again
            return False
        return s.installed_version == VERSION and s.trial is None

    def installed_manifest_bytes(self, name: str) -> int:
        """Size of the signed manifest a device stored: what one manifest fetch costs."""
        from fleetpush.client.layout import StateLayout

        return StateLayout.of(self.device_dir(name) / "state").installed_manifest.stat().st_size

    def _wait(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            for name, proc in self.agents.items():
                if proc.poll() is not None and name not in self.killed:
                    raise RuntimeError(f"the agent of {name} exited: see {self.logs}/{name}.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.5)

    def wait_installed(self, names: list[str], timeout: float) -> None:
        self._wait(
            lambda: all(self.installed(n) for n in names),
            timeout,
            f"{len(names)} device(s) to install {VERSION}",
        )

    def wait_connected(self, timeout: float) -> None:
        def all_in() -> bool:
            m = self.metrics() or {}
            return m.get("fleetpush_connected_devices", 0) >= len(self.names)

        self._wait(all_in, timeout, "every agent to connect")

    # -- the hostile pair -----------------------------------------------------------------

    def corrupt_liar(self) -> None:
        """Overwrite every file the liar holds of the release with 0xFF, in place."""
        d = self.device_dir("liar")
        held = [d / "app" / f for f in ("a.bin", "b.bin")]
        held += list((d / "state").rglob("*.bin"))
        for path in held:
            if path.is_file():
                n = path.stat().st_size
                with path.open("r+b") as f:
                    f.write(b"\xff" * n)

    def silence_mute(self) -> None:
        """Where mute says it serves, a listener accepts and never answers (logs each accept)."""
        code = (
            "import socket\n"
            f"s = socket.create_server(({self.silent!r}, {P2P_PORT}))\n"
            "held = []\n"
            "while True:\n"
            "    c, a = s.accept()\n"
            "    held.append(c)\n"
            "    print('accepted', a[0], flush=True)\n"
        )
        log = self.logs / "mute-listener.log"
        self.lan.popen(self.ns["mute"], [sys.executable, "-c", code], log)

    def mute_accepts(self) -> int:
        """Connections the silent listener accepted (and never answered)."""
        log = self.logs / "mute-listener.log"
        return log.read_text().count("accepted") if log.exists() else 0

    def bad_rows(self) -> list[list[str]]:
        """p2p_bad as stored: (device, version, reporter, reason)."""
        db = sqlite3.connect(f"file:{self.data / 'fleetpush.db'}?mode=ro", uri=True, timeout=10)
        try:
            return [
                [str(r[0]), str(r[1]), str(r[2]), str(r[3])]
                for r in db.execute("SELECT device_id, version, reporter, reason FROM p2p_bad")
            ]
        finally:
            db.close()

    def agent_cost(self, name: str) -> tuple[int, float]:
        """(peak RSS bytes, CPU seconds) of device ``name``'s agent process so far.

        ``ip netns exec`` execs the agent in place, so the Popen pid is the agent's.
        """
        pid = self.agents[name].pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0, 0.0
        rss = next(
            (int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmHWM:")), 0
        )
        ticks = os.sysconf("SC_CLK_TCK")
        return rss, (int(stat[11]) + int(stat[12])) / ticks

    def kill_agent(self, name: str) -> None:
        """SIGKILL device ``name``'s agent and its app: the device vanishes."""
        self.killed.add(name)
        self.lan.kill(self.agents[name])

    def listening(self, name: str) -> list[str]:
        """The TCP ports listening in device ``name``'s namespace (only its agent runs there)."""
        out = self.lan.run(self.ns[name], ["ss", "-ltnH"])
        return [line.split()[3] for line in out.stdout.splitlines() if line.strip()]

    def status_text(self, name: str) -> str:
        """``fleetpush status`` as the device's operator reads it (plain text)."""
        d = self.device_dir(name)
        out = self.lan.run(self.ns[name], [*FLEETPUSH, "status", "--config", str(d / "agent.toml")])
        return out.stdout

    def p2p_status(self, name: str) -> dict[str, Any]:
        d = self.device_dir(name)
        out = self.lan.run(
            self.ns[name], [*FLEETPUSH, "status", "--config", str(d / "agent.toml"), "--json"]
        )
        doc = json.loads(out.stdout) if out.returncode == 0 else {}
        p2p = doc.get("p2p") if isinstance(doc, dict) else None
        return p2p if isinstance(p2p, dict) else {}


def run(
    work: Path, devices: int, size: int, chunk: int = 1 << 20, timeout: float = 600
) -> dict[str, Any]:
    """The whole story in ``work``; returns its figures (and leaves the trees for checks)."""
    with Lan() as lan:
        fleet = Fleet(lan, work, devices, size, chunk)
        fleet.setup()
        fleet.wait_connected(120)
        hostile = ["liar", "mute"]
        first = fleet.cli(
            "deploy", "create", APP, VERSION, *(a for n in hostile for a in ("--device", n))
        )
        fleet.wait_installed(hostile, timeout)
        fleet.manifest_bytes = fleet.installed_manifest_bytes("liar")
        before = fleet.chunk_bytes_served()
        wire_before = lan.bridge_tx_bytes()
        fleet.corrupt_liar()
        fleet.silence_mute()
        honest = fleet.names[2:]
        phases, n = [], 1
        while n < len(honest):
            phases.append(str(n))
            n = 2 * n + 1
        phases.append("100%")
        started = time.monotonic()
        second = fleet.cli(
            "deploy", "create", APP, VERSION, "--phases", ",".join(phases),
            *(a for n in honest for a in ("--device", n)),
        )  # fmt: skip
        fleet.wait_installed(honest, timeout)
        elapsed = time.monotonic() - started
        egress = fleet.chunk_bytes_served() - before
        wire = lan.bridge_tx_bytes() - wire_before
        metrics = fleet.metrics() or {}
        events = fleet.cli("events", "--type", "bad_peer", "--limit", "1000")
        deliveries = fleet.cli("events", "--type", "p2p_delivery", "--limit", "10000")
        shown = fleet.cli("deploy", "show", second["deployment_id"])
        devices_view = fleet.cli("devices")
        shown_text = fleet.cli_text("deploy", "show", second["deployment_id"])
        from_peers = sum(
            int(e["data"]["from_peers"]) for e in deliveries if e["device_id"] in honest
        )
        from_releaser = sum(
            int(e["data"]["from_releaser"]) for e in deliveries if e["device_id"] in honest
        )
        liar_status = fleet.p2p_status("liar")
        costs = sorted(fleet.agent_cost(n) for n in honest)
        rss = sorted(c[0] for c in costs)
        cpu = sorted(c[1] for c in costs)
        result = {
            "devices": devices,
            "honest_devices": len(honest),
            "release_bytes": size,
            "chunk_bytes": chunk,
            "manifest_bytes": fleet.manifest_bytes,
            "phases": phases,
            "hostile_deployment": first["deployment_id"],
            "deployment": second["deployment_id"],
            "releaser_chunk_bytes": egress,
            "egress_ratio": round(egress / size, 3),
            "egress_limit_bytes": int(1.2 * size) + len(honest) * fleet.manifest_bytes,
            "releaser_wire_bytes": wire,
            "device_bytes_from_peers": from_peers,
            "device_bytes_from_releaser": from_releaser,
            "delivered_bytes_metric": {
                k.split('"')[1]: int(v)
                for k, v in metrics.items()
                if k.startswith("fleetpush_delivered_bytes_total{")
            },
            "seconds_to_all_installed": round(elapsed, 1),
            "bad_peer_events": [
                {"device_id": e["device_id"], **{k: e["data"][k] for k in ("reporter", "reason")}}
                for e in events
            ],
            "p2p_bad_rows": fleet.bad_rows(),
            "liar_uploaded": liar_status,
            "mute_links_accepted": fleet.mute_accepts(),
            # Every honest agent's whole life: start, connect, download (peers
            # first), verify, install, serve the devices of later phases.
            "agent_peak_rss_bytes": {"median": rss[len(rss) // 2], "max": rss[-1]},
            "agent_cpu_s": {"median": round(cpu[len(cpu) // 2], 2), "max": round(cpu[-1], 2)},
            "deploy_show": shown,
            "devices_view": devices_view,
            "deploy_show_text": shown_text,
            "installed": sorted(n for n in fleet.names if fleet.installed(n)),
            "src": str(fleet.src),
            "work": str(work),
        }
        return result
