"""The releaser as peer tracker over real TCP (issue 18, specs/PROTOCOL.md §7.11).

Devices on 127.0.0.1 announce a LAN (subnet) and a p2p port with
``get_peers``; an asker gets the near holders and a peer token signed by the
releaser's timestamp key; a reported liar is never handed out again.
"""

from __future__ import annotations

from pathlib import Path

import trio
from fleetpush.protocol import PROTOCOL_VERSION, keys
from fleetpush.protocol.keys import private_key_to_pem
from fleetpush.protocol.messages import EventFilter, Hello
from fleetpush.protocol.p2p import GetPeers, PeerList, ReportPeer, verify_peer_token
from fleetpush.protocol.trust import TrustRoot
from fp_keys import OPERATOR_KEY, fixed_key
from fp_releaser import publish, releaser
from fp_trees import make_tree

from fleetpush.net.dial import dial
from fleetpush.operator import connect as operator_connect

TIMESTAMP = fixed_key(0xB5)
LAN = "192.168.7.0/24"


def hello(device: str, version: str) -> Hello:
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id=device,
        public_key=keys.public_bytes(fixed_key(device)),
        app="demo",
        version=version,
    )


async def test_tracker_hands_out_near_holders_with_a_token_and_drops_liars(
    tmp_path: Path,
) -> None:
    data = tmp_path / "releaser"
    data.mkdir()
    publish(data, make_tree(tmp_path / "src", {"app.txt": b"demo 2.0\n"}), "2.0", approved=True)
    (tmp_path / "ts.key").write_bytes(private_key_to_pem(TIMESTAMP))
    holders = {"h1": LAN, "h2": LAN, "far": "10.9.0.0/16"}
    with trio.fail_after(30):
        async with releaser(data, timestamp_key=tmp_path / "ts.key") as handle:
            where = ("127.0.0.1", handle.port)
            async with trio.open_nursery() as nursery:
                ready = trio.Event()
                done = trio.Event()
                joined: list[str] = []

                async def hold(device: str, subnet: str) -> None:
                    async with dial(
                        where, fixed_key(device), hello(device, "2.0"), name=device, timeout=10
                    ) as link:
                        await link.peer.request(
                            "get_peers",
                            GetPeers(app="demo", version="2.0", subnet=subnet, port=7879),
                        )
                        joined.append(device)
                        if len(joined) == len(holders):
                            ready.set()
                        await done.wait()

                for device, subnet in holders.items():
                    nursery.start_soon(hold, device, subnet)
                await ready.wait()
                async with dial(
                    where, fixed_key("asker"), hello("asker", "1.0"), name="a", timeout=10
                ) as link:
                    ask = GetPeers(app="demo", version="2.0", subnet=LAN, port=0)
                    got: PeerList = await link.peer.request("get_peers", ask)
                    assert sorted(p.device_id for p in got.peers) == ["h1", "h2"]
                    assert {(p.host, p.port) for p in got.peers} == {("127.0.0.1", 7879)}
                    assert got.token is not None
                    trust = TrustRoot.from_public_keys([keys.public_bytes(TIMESTAMP)])
                    token = verify_peer_token(
                        trust,
                        got.token,
                        me="h1",
                        asker="asker",
                        asker_key=keys.public_bytes(fixed_key("asker")),
                        app="demo",
                        version="2.0",
                        now=token_time(got),
                    )
                    assert sorted(token.peers) == ["h1", "h2"]
                    await link.peer.request(
                        "report_peer",
                        ReportPeer(app="demo", version="2.0", peer_id="h1", reason="corrupt"),
                    )
                    again: PeerList = await link.peer.request("get_peers", ask)
                    assert [p.device_id for p in again.peers] == ["h2"]
                done.set()
            async with operator_connect(where, OPERATOR_KEY, name="ops") as op:
                events = await op.call("list_events", EventFilter(device_id="h1"))
            kinds = [e.kind for e in events.events]
            assert "bad_peer" in kinds


def token_time(got: PeerList) -> float:
    from fleetpush.protocol.p2p import PeerToken

    assert got.token is not None
    return PeerToken.from_bytes(got.token.signed).issued + 1
