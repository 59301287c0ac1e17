"""The dashboard's device page names who reported the device as a bad LAN peer (issue 18).

A real releaser process with the dashboard; two devices connect through the
real handshake and one reports the other's chunk as corrupt (``report_peer``,
what an agent sends after a peer pass). The page is fetched over plain HTTP
with a signed-in session (no browser needed for static facts).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import trio
from fleetpush.protocol import PROTOCOL_VERSION
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Hello
from fleetpush.protocol.p2p import ReportPeer
from fp_keys import fixed_key
from web_helpers import request, sign_in, web_releaser_process

from fleetpush.net.dial import dial


def fact(body: str, name: str) -> str:
    m = re.search(rf'<dd data-fact="{name}">(.*?)</dd>', body)
    assert m is not None, body[:2000]
    return html.unescape(m.group(1))


async def test_device_page_shows_bad_peer_reports(tmp_path: Path) -> None:
    with trio.fail_after(60), web_releaser_process(tmp_path / "data") as rel:
        where = ("127.0.0.1", rel.port)
        async with (
            dial(where, fixed_key("w0"), _hello("w0"), timeout=10) as reporter,
            dial(where, fixed_key("w1"), _hello("w1"), timeout=10),
        ):
            await reporter.peer.request(
                "report_peer",
                ReportPeer(app="demo", version="2.0", peer_id="w1", reason="corrupt"),
            )
            cookie = await trio.to_thread.run_sync(sign_in, rel.web)
            page = await trio.to_thread.run_sync(
                lambda: request(rel.web, "/devices/w1", session=cookie)
            )
            assert page.status == 200, page
            assert fact(page.body, "bad peer").startswith("by w0 for demo 2.0 (corrupt, ")
            page = await trio.to_thread.run_sync(
                lambda: request(rel.web, "/devices/w0", session=cookie)
            )
            assert fact(page.body, "bad peer") == "-"


def _hello(device: str) -> Hello:
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id=device,
        public_key=public_bytes(fixed_key(device)),
        app="demo",
        version="1.0",
    )
