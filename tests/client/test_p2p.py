"""Peer-to-peer delivery over real TCP on 127.0.0.1 (issue 18, specs/PROTOCOL.md §7.11).

Serving devices run client/p2p_serve.py on port 0; the asking device runs the
peer pre-pass (client/p2p_fetch.py) and then the ordinary download from a
tiny releaser (fleet_helpers.MiniReleaser), which fetches only what the peers
did not deliver.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import trio
from fleet_helpers import MiniReleaser, build_release, chunks_valid
from fleetpush.client.download import download
from fleetpush.client.layout import StateLayout
from fleetpush.client.p2p_fetch import FetchContext, all_chunks, fetch_from_peers
from fleetpush.client.p2p_serve import Held, ServeContext, serve_peers
from fleetpush.protocol import PROTOCOL_VERSION, keys
from fleetpush.protocol.manifest import Manifest
from fleetpush.protocol.messages import Hello, SignedManifest
from fleetpush.protocol.p2p import PeerAddr, PeerToken, sign_peer_token
from fleetpush.protocol.trust import TrustRoot
from fp_keys import DEVICE_KEY, fixed_key
from fp_trees import make_tree

from fleetpush.net.dial import dial

TS = fixed_key(0xB4)  # the releaser's timestamp key
TRUST = TrustRoot.from_public_keys([keys.public_bytes(TS)])
FILES = {"bin/app": 300_000, "data/big.bin": 700_000}


def token(asker: str, peers: list[str], now: float, app: str = "demo") -> SignedManifest:
    t = PeerToken(
        server_id="fp-test",
        issued=int(now) - 1,
        expires=int(now) + 300,
        asker=asker,
        asker_key=keys.public_bytes(DEVICE_KEY),
        app=app,
        version="2.0",
        peers=peers,
    )
    return sign_peer_token(t, [TS])


def serving(device_id: str, signed: SignedManifest, m: Manifest, files: Path) -> ServeContext:
    return ServeContext(
        device_id=device_id,
        trust=lambda: TRUST,
        holdings=lambda app, v: Held(signed, m, files) if (app, v) == (m.app, m.version) else None,
        now=time.time,
    )


async def silent(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A peer that accepts and never answers (it withholds)."""
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(hold, listeners)


async def releaser_download(r: MiniReleaser, signed, m, layout, app_root):  # type: ignore[no-untyped-def]
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id="asker",
        public_key=keys.public_bytes(DEVICE_KEY),
        app="demo",
        version="1.0",
    )
    async with dial(("127.0.0.1", r.port), DEVICE_KEY, hello, timeout=10, name="t") as link:
        return await download(link.peer, signed, m, layout, app_root)


@pytest.fixture
async def releaser(nursery: trio.Nursery) -> MiniReleaser:
    r = MiniReleaser()
    await nursery.start(r.serve)
    return r


async def test_peers_serve_most_chunks_a_liar_is_dropped_and_a_mute_peer_replaced(
    nursery: trio.Nursery, releaser: MiniReleaser, tmp_path: Path
) -> None:
    src = make_tree(tmp_path / "src", FILES, seed=5)
    signed, m = build_release(src, app="demo", version="2.0", sequence=2)
    releaser.add(src, signed, m)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    with open(bad / "data/big.bin", "r+b") as f:  # every chunk of this file is a lie
        f.write(b"\xff" * 700_000)
    good_ctx = serving("good", signed, m, src)
    liar_ctx = serving("liar", signed, m, bad)
    good_port = await nursery.start(serve_peers, good_ctx, "127.0.0.1", 0)
    liar_port = await nursery.start(serve_peers, liar_ctx, "127.0.0.1", 0)
    mute_port = await nursery.start(silent)
    peers = [
        PeerAddr(device_id="good", host="127.0.0.1", port=good_port),
        PeerAddr(device_id="liar", host="127.0.0.1", port=liar_port),
        PeerAddr(device_id="mute", host="127.0.0.1", port=mute_port),
    ]
    reports: list[tuple[str, str]] = []

    async def report(peer: str, reason: str) -> None:
        reports.append((peer, reason))

    ctx = FetchContext(device_id="asker", key=DEVICE_KEY, report=report, connect_timeout=1.0)
    layout = StateLayout.of(tmp_path / "state")
    app_root = tmp_path / "app"
    app_root.mkdir()
    files = layout.staged_files("2.0")
    tok = token("asker", ["good", "liar", "mute"], time.time())
    with trio.fail_after(30):
        got = await fetch_from_peers(
            ctx, peers, token=tok, manifest=m, files_dir=files, missing=all_chunks(m)
        )
        assert got.dropped["liar"] == "corrupt"
        # The mute peer never completes its handshake: the pass does not wait
        # for it (it may end before its dial gives up) and it delivers nothing.
        assert got.dropped.get("mute") in (None, "gone")
        assert reports == [("liar", "corrupt")]
        # The liar's honest chunks (bin/app) count too, until its first lie.
        sent = good_ctx.counters.bytes_sent + liar_ctx.counters.bytes_sent
        assert good_ctx.counters.bytes_sent > 0 and 0 < got.bytes_from_peers <= sent
        from_peers = chunks_valid(files, m)
        result = await releaser_download(releaser, signed, m, layout, app_root)
    for rel in FILES:  # 0 corrupted bytes: the staged files are exactly the release
        assert (files / rel).read_bytes() == (src / rel).read_bytes()
    assert result.chunks_resumed == len(from_peers)
    assert set(releaser.chunks_served).isdisjoint(from_peers)


async def test_a_peer_refuses_a_token_not_naming_it_and_the_releaser_serves_all(
    nursery: trio.Nursery, releaser: MiniReleaser, tmp_path: Path
) -> None:
    src = make_tree(tmp_path / "src", FILES, seed=6)
    signed, m = build_release(src, app="demo", version="2.0", sequence=2)
    releaser.add(src, signed, m)
    ctx_b = serving("b", signed, m, src)
    port = await nursery.start(serve_peers, ctx_b, "127.0.0.1", 0)

    async def report(peer: str, reason: str) -> None:
        raise AssertionError("a refusing peer is not a lying one")

    ctx = FetchContext(device_id="asker", key=DEVICE_KEY, report=report, connect_timeout=2.0)
    layout = StateLayout.of(tmp_path / "state")
    app_root = tmp_path / "app"
    app_root.mkdir()
    now = time.time()
    with trio.fail_after(30):
        for tok in (token("asker", ["someone-else"], now), token("asker", ["b"], now, app="x")):
            got = await fetch_from_peers(
                ctx,
                [PeerAddr(device_id="b", host="127.0.0.1", port=port)],
                token=tok,
                manifest=m,
                files_dir=layout.staged_files("2.0"),
                missing=all_chunks(m),
            )
            assert got.bytes_from_peers == 0 and got.dropped == {"b": "gone"}
        assert ctx_b.counters.refused == 2 and ctx_b.counters.bytes_sent == 0
        result = await releaser_download(releaser, signed, m, layout, app_root)
    assert result.chunks_fetched == m.total_chunks


async def test_peers_vanishing_mid_download_leave_the_releaser_to_finish(
    nursery: trio.Nursery, releaser: MiniReleaser, tmp_path: Path
) -> None:
    src = make_tree(tmp_path / "src", FILES, seed=7)
    signed, m = build_release(src, app="demo", version="2.0", sequence=2)
    releaser.add(src, signed, m)
    # Paced to 64 KiB/s each, so the peers are still sending when they vanish.
    ctxs = [serving(name, signed, m, src) for name in ("p1", "p2")]
    for c in ctxs:
        c.max_rate = 64 * 1024
    peers_scope = trio.CancelScope()
    ports: list[int] = []

    async def run_peers(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with peers_scope:
            async with trio.open_nursery() as inner:
                for c in ctxs:
                    ports.append(await inner.start(serve_peers, c, "127.0.0.1", 0))
                task_status.started()

    await nursery.start(run_peers)

    async def no_report(peer: str, reason: str) -> None:
        raise AssertionError("a vanished peer is not a lying one")

    ctx = FetchContext(device_id="asker", key=DEVICE_KEY, report=no_report, connect_timeout=2.0)
    layout = StateLayout.of(tmp_path / "state")
    app_root = tmp_path / "app"
    app_root.mkdir()
    files = layout.staged_files("2.0")
    peers = [
        PeerAddr(device_id=n, host="127.0.0.1", port=p)
        for n, p in zip(("p1", "p2"), ports, strict=True)
    ]
    tok = token("asker", ["p1", "p2"], time.time())

    async def vanish() -> None:
        while sum(c.counters.bytes_sent for c in ctxs) == 0:
            await trio.sleep(0.01)
        peers_scope.cancel()  # every peer process "dies": links drop mid-stream

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(vanish)
            got = await fetch_from_peers(
                ctx, peers, token=tok, manifest=m, files_dir=files, missing=all_chunks(m)
            )
        assert set(got.dropped.values()) <= {"gone"}
        partial = chunks_valid(files, m)
        assert len(partial) < m.total_chunks
        result = await releaser_download(releaser, signed, m, layout, app_root)
    for rel in FILES:
        assert (files / rel).read_bytes() == (src / rel).read_bytes()
    assert result.chunks_fetched == m.total_chunks - len(partial)
