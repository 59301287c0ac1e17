"""LAN peer delivery end to end (issue 18): a real releaser, real Updaters, real TCP.

The releaser holds a timestamp key named by the devices' root, so it hands
out signed peer tokens. ``holder`` (p2p on) stages 2.0 from the releaser and
serves it; ``asker`` (p2p on, same reported LAN) then stages 2.0 and gets its
chunks from ``holder``: the releaser sends it no chunk. A device with p2p off
opens no port.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleet_helpers import InProcessHost
from fleetpush.client import Updater
from fleetpush.protocol import keys
from fleetpush.protocol.keys import private_key_to_pem
from fleetpush.protocol.messages import EventFilter
from fleetpush.protocol.root import Role, Root, envelope_from_json, envelope_to_json, sign_root
from fleetpush.server.roots import publish_root
from fp_devices import device_config
from fp_keys import OPERATOR_KEY, fixed_key
from fp_releaser import approve_in_store, publish, releaser
from fp_trees import make_tree

from fleetpush.operator import connect as operator_connect

ROOT_KEY, RELEASE, TIMESTAMP = (fixed_key(s) for s in (0xC1, 0xC2, 0xC3))
FAR = 4_102_444_800


def root_file(tmp: Path) -> Path:
    def kid(k: Ed25519PrivateKey) -> str:
        return keys.keyid(k)

    root = Root(
        version=1,
        expires=FAR,
        keys={kid(k): keys.public_bytes(k) for k in (ROOT_KEY, RELEASE, TIMESTAMP)},
        root=Role(keys=[kid(ROOT_KEY)], threshold=1),
        release=Role(keys=[kid(RELEASE)], threshold=1),
        timestamp=Role(keys=[kid(TIMESTAMP)], threshold=1),
    )
    path = tmp / "root-1.json"
    path.write_bytes(envelope_to_json(sign_root(root.to_bytes(), [ROOT_KEY])))
    return path


def setup(tmp: Path) -> Path:
    data = tmp / "releaser"
    data.mkdir()
    publish_root(data, envelope_from_json(root_file(tmp).read_bytes()), now=time.time())
    src = make_tree(tmp / "src", {"bin/app": 400_000, "data.bin": 300_000}, seed=3)
    publish(data, src, "2.0", keys=[RELEASE], release_keys=[keys.public_bytes(RELEASE)])
    approve_in_store(data, "2.0")
    (tmp / "timestamp.key").write_bytes(private_key_to_pem(TIMESTAMP))
    return data


def device(tmp: Path, name: str, port: int, **kw: object) -> Updater:
    cfg = device_config(tmp / name, port, device_id=name, **kw)
    cfg = cfg.evolve(trusted_keys=(), root=root_file(tmp))
    return Updater(cfg, host=InProcessHost())


P2P = {"p2p": True, "p2p_listen": "127.0.0.1:0", "p2p_host": "127.0.0.1", "p2p_subnet": "lan"}


async def test_a_device_stages_a_release_from_its_lan_peer(tmp_path: Path) -> None:
    data = setup(tmp_path)
    with trio.fail_after(60):
        async with releaser(data, timestamp_key=tmp_path / "timestamp.key") as handle:
            holder = device(tmp_path, "holder", handle.port, **P2P)
            asker = device(tmp_path, "asker", handle.port, **P2P)
            plain = device(tmp_path, "plain", handle.port)
            assert plain.ctx.p2p is None  # p2p off: nothing to listen with
            assert plain.status()["p2p"] is None
            async with trio.open_nursery() as nursery, holder.connected():
                assert holder.ctx.p2p is not None
                await holder.ctx.p2p.start(nursery, lambda: False)
                await holder.session.wait_connected(5)
                info = await holder.check()
                assert info.verified is not None
                await holder.stage(info.verified)
                assert holder.ctx.p2p.last is None  # nobody held 2.0 yet
                async with asker.connected():
                    await asker.session.wait_connected(5)
                    info = await asker.check()
                    assert info.verified is not None
                    await asker.stage(info.verified)
                    got = asker.ctx.p2p.last if asker.ctx.p2p else None
                    assert got is not None and got.dropped == {}
                    assert got.bytes_from_peers == 700_000
                    assert asker.last_download is None or asker.last_download.chunks_fetched == 0
                serving = holder.ctx.p2p.serving
                assert serving is not None and serving.counters.bytes_sent == 700_000
                up = holder.status()["p2p"]  # what ``fleetpush status`` shows
                assert up["bytes_uploaded"] == 700_000 and up["port"] == holder.ctx.p2p.port
                nursery.cancel_scope.cancel()
            # The operator sees how the release arrived (watch/events, metrics).
            async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY, name="o") as op:
                while True:
                    page = await op.call(
                        "list_events", EventFilter(device_id="asker", kinds=["p2p_delivery"])
                    )
                    if page.events:
                        break
                    await trio.sleep(0.05)
            assert page.events[0].data["from_peers"] == 700_000
            assert page.events[0].data["from_releaser"] == 0
    staged = tmp_path / "asker/state/updates/2.0/files"
    assert (staged / "bin/app").read_bytes() == (tmp_path / "src/bin/app").read_bytes()
    assert (staged / "data.bin").read_bytes() == (tmp_path / "src/data.bin").read_bytes()
