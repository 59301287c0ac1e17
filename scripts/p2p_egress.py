"""Releaser egress with LAN peer delivery, measured (issue 18).

    python scripts/p2p_egress.py [--devices 50] [--size 8MiB] [--concurrency 8]

One process, real TCP on 127.0.0.1: a tiny releaser (tests/client/fleet_helpers
``MiniReleaser``, which counts the bytes it sends) and ``--devices`` devices.
Two of them are hostile and hold the release from the start: ``liar`` serves
a tree whose second file is all 0xFF (every chunk of it fails its digest),
``mute`` accepts and never answers. The first device goes alone (a rollout's
canary phase); then every other device, ``--concurrency`` at a time, asks the
tracker's choice of peers (``select_peers`` over the devices that finished and
the two hostile ones, minus reported liars: what the releaser does in
server/p2p_api.py), runs the peer pre-pass (client/p2p_fetch.py) and then the
ordinary download from the releaser for the rest; it then checks its staged
files byte for byte against the release and starts serving
(client/p2p_serve.py). Printed: the releaser's egress (DATA payload + manifest
bytes), its ratio to the release size, the bytes devices got from peers,
corrupted bytes kept (must be 0), and when the liar was reported. Not a test:
no assertion on time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "support"), str(ROOT / "tests" / "client")]

from fleet_helpers import MiniReleaser, build_release  # noqa: E402
from fleetpush.client.download import download  # noqa: E402
from fleetpush.client.layout import StateLayout  # noqa: E402
from fleetpush.client.p2p_fetch import FetchContext, all_chunks, fetch_from_peers  # noqa: E402
from fleetpush.client.p2p_serve import Held, ServeContext, serve_peers  # noqa: E402
from fleetpush.protocol import PROTOCOL_VERSION, keys  # noqa: E402
from fleetpush.protocol.messages import Hello  # noqa: E402
from fleetpush.protocol.p2p import PeerAddr, PeerToken, sign_peer_token  # noqa: E402
from fleetpush.protocol.p2p_policy import Candidate, select_peers  # noqa: E402
from fleetpush.protocol.trust import TrustRoot  # noqa: E402
from fp_keys import fixed_key  # noqa: E402
from fp_trees import make_tree  # noqa: E402

from fleetpush.net.dial import dial  # noqa: E402

TS = fixed_key("p2p-egress-timestamp")
TRUST = TrustRoot.from_public_keys([keys.public_bytes(TS)])


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, mult in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


async def silent(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def hold(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(hold, listeners)


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="p2p-egress-"))
    try:
        half = args.size // 2
        src = make_tree(tmp / "src", {"a.bin": half, "b.bin": args.size - half}, seed=9)
        signed, m = build_release(src, app="demo", version="2.0", sequence=2)
        bad = tmp / "bad"
        shutil.copytree(src, bad)
        (bad / "b.bin").write_bytes(b"\xff" * (args.size - half))
        r = MiniReleaser()
        r.add(src, signed, m)
        manifest_bytes = len(signed.signed)
        serving: dict[str, Candidate] = {}
        reported: dict[str, str] = {}
        from_peers = 0
        corrupt_kept = 0
        done = 0
        fallbacks: list[str] = []

        async with trio.open_nursery() as nursery:
            await nursery.start(r.serve)

            async def start_serving(device: str, files: Path) -> None:
                ctx = ServeContext(
                    device_id=device,
                    trust=lambda: TRUST,
                    holdings=lambda a, v: Held(signed, m, files),
                    now=time.time,
                )
                port = await nursery.start(serve_peers, ctx, "127.0.0.1", 0)
                serving[device] = Candidate(
                    device_id=device, public_addr="lan", subnet="lan", host="127.0.0.1", port=port
                )

            await start_serving("liar", bad)
            mute_port = await nursery.start(silent)
            serving["mute"] = Candidate(
                device_id="mute", public_addr="lan", subnet="lan", host="127.0.0.1", port=mute_port
            )
            limiter = trio.CapacityLimiter(args.concurrency)

            async def device(i: int) -> None:
                nonlocal from_peers, corrupt_kept, done
                name = f"dev-{i:03d}"
                key = fixed_key(name)
                async with limiter:
                    me = Candidate(device_id=name, public_addr="lan", subnet="lan")
                    chosen = select_peers(me, list(serving.values()), bad=frozenset(reported), n=4)
                    layout = StateLayout.of(tmp / name / "state")
                    app_root = tmp / name / "app"
                    app_root.mkdir(parents=True)
                    files = layout.staged_files("2.0")
                    if chosen:
                        now = int(time.time())
                        token = sign_peer_token(
                            PeerToken(
                                server_id="bench",
                                issued=now - 1,
                                expires=now + 900,
                                asker=name,
                                asker_key=keys.public_bytes(key),
                                app="demo",
                                version="2.0",
                                peers=[c.device_id for c in chosen],
                            ),
                            [TS],
                        )

                        async def report(peer: str, reason: str) -> None:
                            reported.setdefault(peer, f"{reason} (by {name}, device #{done + 1})")

                        got = await fetch_from_peers(
                            FetchContext(
                                device_id=name, key=key, report=report, connect_timeout=5.0
                            ),
                            [
                                PeerAddr(device_id=c.device_id, host=c.host, port=c.port)
                                for c in chosen
                            ],
                            token=token,
                            manifest=m,
                            files_dir=files,
                            missing=all_chunks(m),
                        )
                        from_peers += got.bytes_from_peers
                    hello = Hello(
                        protocol_version=PROTOCOL_VERSION,
                        role="device",
                        peer_id=name,
                        public_key=keys.public_bytes(key),
                        app="demo",
                        version="1.0",
                    )
                    async with dial(
                        ("127.0.0.1", r.port), key, hello, timeout=30, name=name
                    ) as link:
                        res = await download(link.peer, signed, m, layout, app_root)
                    if res.chunks_fetched:
                        fallbacks.append(f"{name}:{res.chunks_fetched}")
                    for f in ("a.bin", "b.bin"):
                        a, b = (files / f).read_bytes(), (src / f).read_bytes()
                        corrupt_kept += sum(x != y for x, y in zip(a, b, strict=True))
                    done += 1
                await start_serving(name, files)

            started = time.monotonic()
            # The first device is the rollout's canary phase: it has no honest
            # peer yet, so it fetches from the releaser (and meets the liar).
            await device(0)
            async with trio.open_nursery() as devices:
                for i in range(1, args.devices - 2):
                    devices.start_soon(device, i)
            elapsed = time.monotonic() - started
            nursery.cancel_scope.cancel()
        egress = r.bytes_sent
        total = args.size * (args.devices - 2)
        print(f"devices: {args.devices} (2 hostile: liar, mute), release {args.size} bytes")
        print(f"releaser egress: {egress} bytes = {egress / args.size:.3f} x release size")
        print(f"  (+ manifests: {manifest_bytes} bytes x {args.devices - 2} devices)")
        print(f"bytes from peers: {from_peers} of {total} delivered ({from_peers / total:.1%})")
        print(f"devices that fetched chunks from the releaser: {' '.join(fallbacks)}")
        print(f"corrupted bytes kept: {corrupt_kept}")
        print(f"reported: {reported or 'none'}")
        print(f"wall: {elapsed:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--size", type=parse_size, default=parse_size("8MiB"))
    p.add_argument("--concurrency", type=int, default=8)
    trio.run(main, p.parse_args())
