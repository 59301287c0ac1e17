"""`fleetpush watch`: a live view of the fleet.

On a terminal: a rich ``Live`` table of the devices (version, state, a
progress bar while downloading, supervised app status) above the newest
events. Otherwise (a pipe, a log file): one plain line per event. Ctrl-C
leaves cleanly with exit code 0.

The table starts from ``list_devices`` and follows the ``event`` stream;
it is also refreshed from ``list_devices`` every few seconds so it stays right
whatever kinds of events the releaser sends.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections import deque
from typing import Any

import attrs
import trio
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fleetpush.operator import OperatorClient
from fleetpush.protocol.messages import DeviceInfo, Event

from . import output, p2p_show
from .console import connection_parent, json_parent, run_operator, to_jsonable
from .exitcodes import EXIT_OK

REFRESH_INTERVAL = 3.0
EVENT_LINES = 12


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "watch",
        parents=[connection_parent(), json_parent()],
        help="live view of devices and events (Ctrl-C to leave)",
        description=(
            "A live terminal view of the fleet: each device with its version, state and a "
            "progress bar while it downloads, and the bytes devices got from LAN peers vs from "
            "the releaser; events scroll below. Prints one line per event "
            "when stdout is not a terminal (--json: one JSON object per line)."
        ),
    )
    p.add_argument("--app", help="only devices of this application")
    p.add_argument("--group", help="only devices in this group")
    p.add_argument("--history", type=int, default=0, metavar="N", help="replay the last N events")
    p.add_argument(
        "--for", dest="duration", type=float, metavar="SECONDS", help="stop after SECONDS"
    )
    p.set_defaults(func=_watch)


@attrs.define
class FleetView:
    """The devices' latest known state, folded from list_devices and events."""

    app: str | None = None
    group: str | None = None
    devices: dict[str, DeviceInfo] = attrs.field(factory=dict)
    events: deque[Event] = attrs.field(factory=lambda: deque(maxlen=EVENT_LINES))
    #: bytes devices reported (``p2p_delivery``, §7.11): from peers, from the releaser
    from_peers: int = 0
    from_releaser: int = 0
    downloads: int = 0

    def reset(self, devices: list[DeviceInfo]) -> None:
        self.devices = {d.device_id: d for d in devices}

    def _wanted(self, d: DeviceInfo) -> bool:
        return (self.app is None or d.app == self.app) and (
            self.group is None or d.group == self.group
        )

    def apply(self, e: Event, *, record: bool = True) -> None:
        if record:
            self.events.append(e)
            if e.kind == "p2p_delivery":
                peers, releaser = e.data.get("from_peers"), e.data.get("from_releaser")
                self.from_peers += peers if isinstance(peers, int) else 0
                self.from_releaser += releaser if isinstance(releaser, int) else 0
                self.downloads += 1
        if e.device_id is None or e.device_id not in self.devices:
            return
        d = self.devices[e.device_id]
        data: dict[str, Any] = e.data
        changes: dict[str, Any] = {"last_seen": e.time}
        if e.kind in ("connected", "device_connected"):
            changes["connected"] = True
        elif e.kind in ("disconnected", "device_disconnected"):
            changes["connected"] = False
        if e.kind in ("app_status",):
            changes["app_status"] = data
        else:
            if isinstance(data.get("state"), str):
                changes["state"] = data["state"]
            for name in ("bytes_done", "bytes_total"):
                if isinstance(data.get(name), int):
                    changes[name] = data[name]
            state, version = data.get("state"), data.get("version")
            if state in ("trial", "committed", "rolled_back") and isinstance(version, str):
                # The version it runs from then on (registry.py, specs/PROTOCOL.md §7.6).
                changes["version"] = version
            if isinstance(state, str) and e.kind == "progress":
                changes["trial_version"] = version if state == "trial" else None
                error = data.get("error")
                changes["state_error"] = error if isinstance(error, str) else None
            if isinstance(data.get("installed"), str):
                changes["version"] = data["installed"]
        self.devices[e.device_id] = attrs.evolve(d, **changes)

    def render(self) -> Group:
        table = Table(title="fleetpush watch", title_justify="left", expand=False, box=None)
        for col in ("DEVICE", "APP", "VERSION", "CONN", "STATE"):
            table.add_column(col, no_wrap=True)
        table.add_column("PROGRESS", width=24)
        table.add_column("APP STATUS")
        for d in sorted(self.devices.values(), key=lambda d: d.device_id):
            if not self._wanted(d):
                continue
            progress: Any = ""
            if d.state == "downloading" and d.bytes_total:
                progress = ProgressBar(total=d.bytes_total, completed=d.bytes_done, width=22)
            style = {"failed": "red", "rolled_back": "yellow", "committed": "green"}.get(
                d.state, ""
            )
            table.add_row(
                d.device_id,
                d.app or "-",
                output.version_text(d),
                "[green]yes[/]" if d.connected else "[dim]no[/]",
                Text(output.device_state(d), style=style),
                progress,
                output.app_status_text(d.app_status),
            )
        lines = [Text(output.describe_event(e), style="dim") for e in self.events]
        split = []
        if self.downloads:  # only once a device reported how its download arrived
            text = p2p_show.delivery_text(self.from_peers, self.from_releaser, self.downloads)
            split = [Text(f"downloads seen: {text}")]
        return Group(table, *split, Text(""), *lines)


def _watch(args: argparse.Namespace) -> int:
    view = FleetView(app=args.app, group=args.group)
    live_mode = sys.stdout.isatty() and not args.json

    async def body(op: OperatorClient) -> int:
        with trio.CancelScope() as scope:
            if args.duration is not None:
                scope.deadline = trio.current_time() + args.duration
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sigint_cancels, scope)
                if live_mode:
                    await _live(op, view, args.history)
                else:
                    await _plain(op, view, args.history, as_json=args.json)
                nursery.cancel_scope.cancel()
        return EXIT_OK

    return run_operator(args, body)


async def _sigint_cancels(scope: trio.CancelScope) -> None:
    """Ctrl-C ends the watch through cancellation, so the connection says bye."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _plain(op: OperatorClient, view: FleetView, history: int, *, as_json: bool) -> None:
    async for event in op.watch(history=history):
        if as_json:  # one object per line, as --help says
            print(output.json_line(to_jsonable(event)), flush=True)
        else:
            print(output.describe_event(event), flush=True)


async def _live(op: OperatorClient, view: FleetView, history: int) -> None:
    view.reset(await op.list_devices())
    with Live(view.render(), auto_refresh=False, transient=False, redirect_stdout=False) as live:

        async def refresher() -> None:
            while True:
                await trio.sleep(REFRESH_INTERVAL)
                view.reset(await op.list_devices())
                for e in list(view.events):
                    if e.time > time.time() - REFRESH_INTERVAL:
                        view.apply(e, record=False)
                live.update(view.render(), refresh=True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresher)
            last = 0.0
            async for event in op.watch(history=history):
                view.apply(event)
                now = time.monotonic()
                if now - last > 0.1:  # cap redraws at ~10/s during a download storm
                    live.update(view.render(), refresh=True)
                    last = now
            nursery.cancel_scope.cancel()
