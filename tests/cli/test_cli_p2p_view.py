"""Issue 18: peer delivery in the operator's views, through the real `fleetpush`
script against a real `fleetpush server`. Devices connect through the real
handshake and send what a real agent sends after a peer pass: ``report_peer``
(a chunk from a peer failed its digest) and ``p2p_bytes`` (how a download
arrived). `devices` marks the reported device, `devices show` says by whom,
when and for which release, `events`/`watch` print the byte split, and
`deploy show` sums it over the deployment's own devices and release."""

from __future__ import annotations

import json
import os
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from cli_helpers import Releaser, cli, devices, run_cli
from fleetpush.protocol import PROTOCOL_VERSION
from fleetpush.protocol.keys import private_key_to_pem, public_bytes
from fleetpush.protocol.messages import Empty, Event, Hello
from fleetpush.protocol.p2p import PeerBytes, ReportPeer
from fleetpush.protocol.p2p_view import P2PQuery
from fp_keys import OPERATOR_KEY, fixed_key
from fp_releaser import publish, releaser
from fp_trees import make_tree

from fleetpush.net.dial import dial
from fleetpush.operator import connect as operator_connect


async def test_devices_mark_a_reported_peer_and_events_show_the_byte_split(
    plain_releaser: Releaser,
) -> None:
    with trio.fail_after(120):
        async with devices(plain_releaser, 3, "dev") as links:
            asker = links[0].peer
            await asker.request(
                "report_peer",
                ReportPeer(app="sensor", version="2.0.0", peer_id="dev-01", reason="corrupt"),
            )
            await asker.notify(
                "p2p_bytes",
                PeerBytes(app="sensor", version="2.0.0", from_peers=3 << 20, from_releaser=1 << 20),
            )
            await asker.request("ping", Empty())  # the notification was handled

            res = await cli(plain_releaser, "devices", "--json")
            assert res.code == 0, res.err
            marks = {d["device_id"]: d["bad_peer_reports"] for d in json.loads(res.out)}
            assert marks == {"dev-00": 0, "dev-01": 1, "dev-02": 0}

            env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
            res = await trio.to_thread.run_sync(
                lambda: run_cli("devices", "--config", str(plain_releaser.config), env=env)
            )
            assert res.code == 0, res.err
            assert "BAD PEER" in res.out.splitlines()[0], res.out
            row = next(r for r in res.out.splitlines() if r.startswith("dev-01"))
            assert "1 report" in row
            row = next(r for r in res.out.splitlines() if r.startswith("dev-02"))
            assert "report" not in row

            res = await cli(plain_releaser, "devices", "show", "dev-01", "--json")
            assert res.code == 0, res.err
            (report,) = json.loads(res.out)["bad_peer_reports"]
            assert {k: report[k] for k in ("reporter", "app", "version", "reason")} == {
                "reporter": "dev-00",
                "app": "sensor",
                "version": "2.0.0",
                "reason": "corrupt",
            }
            res = await cli(plain_releaser, "devices", "show", "dev-01")
            assert "reported by dev-00 for sensor 2.0.0: corrupt" in res.out, res.out
            res = await cli(plain_releaser, "devices", "show", "dev-02")
            assert "reported as a bad peer: never" in res.out, res.out

            res = await cli(plain_releaser, "events", "--type", "p2p_delivery")
            assert res.code == 0, res.err
            assert "3.0 MiB from peers, 1.0 MiB from the releaser" in res.out, res.out
            # watch without a terminal: one line per event, replayed with --history.
            res = await cli(plain_releaser, "watch", "--history", "20", "--for", "2")
            assert res.code == 0, res.err
            line = next(r for r in res.out.splitlines() if "p2p_delivery" in r)
            assert "dev-00" in line and "3.0 MiB from peers" in line, res.out
            res = await cli(plain_releaser, "watch", "--history", "20", "--for", "2", "--json")
            docs = [json.loads(r) for r in res.out.splitlines()]
            split = next(d["data"] for d in docs if d["kind"] == "p2p_delivery")
            assert (split["from_peers"], split["from_releaser"]) == (3 << 20, 1 << 20)
            res = await cli(plain_releaser, "events", "--type", "bad_peer")
            assert "dev-01" in res.out and "reporter=dev-00" in res.out, res.out


async def test_deploy_show_sums_the_split_over_its_own_devices_and_release(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    publish(data, make_tree(tmp_path / "src", {"app.bin": 4096}), "2.0.0", approved=True)
    key = tmp_path / "operator.key"
    key.write_bytes(private_key_to_pem(OPERATOR_KEY))
    with trio.fail_after(60):
        async with releaser(data) as handle:
            where = ("127.0.0.1", handle.port)
            async with AsyncExitStack() as stack:
                links = [
                    await stack.enter_async_context(
                        dial(where, fixed_key(n), _hello(n), timeout=10, name=n)
                    )
                    for n in ("d-0", "d-1", "d-2")
                ]
                console = ["--insecure", "--server", f"127.0.0.1:{handle.port}"]
                console += ["--operator-key", str(key)]
                made = await trio.to_thread.run_sync(
                    lambda: run_cli(
                        "deploy", "create", "demo", "2.0.0", "--device", "d-0",
                        "--device", "d-1", "--json", *console,
                    )
                )  # fmt: skip
                assert made.code == 0, made.err
                dep = json.loads(made.out)["deployment_id"]
                # d-2 is not in the deployment; the 1.9.0 report is another release.
                for link, version, peers, rel in (
                    (links[0], "2.0.0", 3 << 20, 1 << 20),
                    (links[1], "2.0.0", 4 << 20, 0),
                    (links[2], "2.0.0", 9 << 20, 0),
                    (links[0], "1.9.0", 5 << 20, 5 << 20),
                ):
                    split = PeerBytes(app="demo", version=version, from_peers=peers,
                                      from_releaser=rel)  # fmt: skip
                    await link.peer.notify("p2p_bytes", split)
                    await link.peer.request("ping", Empty())
                shown = await trio.to_thread.run_sync(
                    lambda: run_cli("deploy", "show", dep, "--json", *console)
                )
                assert shown.code == 0, shown.err
                assert json.loads(shown.out)["delivery"] == {
                    "from_peers": 7 << 20,
                    "from_releaser": 1 << 20,
                    "devices_reported": 2,
                }
                text = await trio.to_thread.run_sync(
                    lambda: run_cli("deploy", "show", dep, *console)
                )
                line = next(r for r in text.out.splitlines() if r.strip().startswith("delivery"))
                assert "7.0 MiB from peers (88%), 1.0 MiB from the releaser" in line, text.out
                assert "2 devices reported" in line


def _hello(device: str) -> Hello:
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id=device,
        public_key=public_bytes(fixed_key(device)),
        app="demo",
        version="1.0.0",
    )


def test_the_live_watch_view_keeps_a_running_total_of_the_split() -> None:
    from rich.console import Console

    from fleetpush.cli.watch_cmd import FleetView

    view = FleetView()
    console = Console(width=200, record=True)
    console.print(view.render())
    assert "downloads seen" not in console.export_text()  # nothing reported yet
    for i, (peers, rel) in enumerate(((3 << 20, 1 << 20), (4 << 20, 0))):
        data = {"app": "demo", "version": "2.0.0", "from_peers": peers, "from_releaser": rel}
        view.apply(Event(seq=i + 1, time=0.0, kind="p2p_delivery", device_id=f"d{i}", data=data))
    console = Console(width=200, record=True)
    console.print(view.render())
    text = console.export_text()
    assert "downloads seen: 7.0 MiB from peers (88%), 1.0 MiB from the releaser" in text
    assert "2 devices reported" in text


async def test_a_console_newer_than_the_releaser_shows_peer_figures_as_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A releaser that predates p2p_view answers METHOD_NOT_FOUND (server/session.py
    # for a method it has no route for): devices and deploy show must still work.
    from fleetpush.server import session

    from fleetpush.cli import p2p_show
    from fleetpush.operator import MethodUnknown

    monkeypatch.delitem(session.ROUTES, "p2p_view")
    data = tmp_path / "data"
    data.mkdir()
    with trio.fail_after(30):
        async with (
            releaser(data) as handle,
            operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY, name="o") as op,
        ):
            with pytest.raises(MethodUnknown):
                await op.call("p2p_view", P2PQuery())
            view = await p2p_show.fetch(op, app="demo")
    assert view is None
    assert p2p_show.bad_counts(view) == {}
    assert p2p_show.delivery_json(view) is None
    assert p2p_show.reports_json(view, "dev-01") is None
    assert p2p_show.report_lines(view, "dev-01") == []
