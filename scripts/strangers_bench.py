"""An honest device among the strangers of issue 10, items 3-7, measured.

    python scripts/strangers_bench.py [--probes 200] [--size 32] [--rounds 2]

Runs a real ``fleetpush server --insecure`` on 127.0.0.1 (nothing else is
contacted) and alternates quiet and loaded phases, ``--rounds`` of each,
quiet first. In a loaded phase these strangers run at once, all from
127.0.0.2 ... 127.0.0.9 (the honest device connects from 127.0.0.1, so the
per-source handshake cap is theirs, not its):

- item 3: authenticated devices each declaring 8 MiB frames and sending one byte;
- item 4: an authenticated device sending an 8 MiB message of nils every second;
- item 5: non-readers asking for the whole release, again and again;
- item 6: operators that ``watch`` and never read, plus a chatty device;
- item 7: slot holders that connect and never say hello.

In each phase the honest device measures ``--probes / (2 * rounds)`` connects
(TCP + hello + auth + ``check_update``) and downloads the release once. Prints
one JSON object: p50/p99/max probe latency (ms) and download MiB/s, quiet vs
loaded. Stops by itself (every phase is bounded; the releaser is terminated).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    Manifest,
    ResponseReceived,
    Side,
    auth_payload,
    sign_challenge,
)
from fleetpush.protocol.frames import HEADER, MAGIC, PROTOCOL_MAJOR, FrameType
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import (
    AppStatus,
    Auth,
    CheckUpdate,
    GetChunks,
    GetManifest,
    Hello,
    Watch,
)
from fleetpush.server import publish_release
from fleetpush.server.releases import ReleaseStore

from fleetpush.net.dial import dial

APP = "strangers"
VERSION = "1.0.0"
MIB = 1024 * 1024
#: where the authenticated strangers connect from, and the slot holders
SOURCES = [f"127.0.0.{i}" for i in range(2, 6)]
HOLDER_SOURCES = [f"127.0.0.{i}" for i in range(10, 18)]
#: strangers that got through their handshake, by kind (the peer id's prefix)
HANDSHAKEN: Counter[str] = Counter()


def device_hello(key: Ed25519PrivateKey, peer_id: str) -> Hello:
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id=peer_id,
        public_key=public_bytes(key),
        app=APP,
        version="0.9.0",
        channel="stable",
    )


async def raw_session(
    port: int, source: str, key: Ed25519PrivateKey, hello: Hello
) -> tuple[trio.SocketStream, Connection]:
    """Authenticate over a bare socket from ``source``; nothing reads afterwards."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    conn = Connection(Side.CLIENT, now=trio.current_time())

    async def answer() -> Any:
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    raise OSError("closed during the handshake")
                conn.receive_data(data, trio.current_time())
            elif isinstance(ev, ResponseReceived):
                return ev.result
            else:
                raise OSError(f"unexpected {ev!r}")

    try:
        with trio.fail_after(10):
            await stream.send_all(conn.send_request("hello", hello)[1])
            result = await answer()
            payload = auth_payload(
                server_id=result.server_id, cid=result.cid, nonce=result.nonce,
                role=hello.role, peer_id=hello.peer_id, public_key=hello.public_key,
            )  # fmt: skip
            auth = Auth(signature=sign_challenge(key, payload))
            await stream.send_all(conn.send_request("auth", auth)[1])
            await answer()
        HANDSHAKEN[hello.peer_id.split("-")[0] + ":authenticated"] += 1
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, conn


async def hold(stream: trio.SocketStream, seconds: float) -> None:
    """Keep ``stream`` open, reading nothing, until it is closed or ``seconds`` pass."""
    with trio.move_on_after(seconds):
        await trio.sleep_forever()
    await trio.aclose_forcefully(stream)


# --- the strangers ------------------------------------------------------------------------


async def declarer(port: int, source: str) -> None:
    key = Ed25519PrivateKey.generate()
    stream, _ = await raw_session(port, source, key, device_hello(key, f"decl-{id(key)}"))
    await stream.send_all(HEADER.pack(MAGIC, PROTOCOL_MAJOR, FrameType.MESSAGE, 8 * MIB) + b"\x94")
    await hold(stream, 30)


async def niller(port: int, source: str) -> None:
    key = Ed25519PrivateKey.generate()
    stream, _ = await raw_session(port, source, key, device_hello(key, f"nil-{id(key)}"))
    n = 8 * MIB - 16
    body = b"\x94\x00\x01\xa6status" + b"\xdd" + struct.pack(">I", n) + b"\xc0" * n
    frame = HEADER.pack(MAGIC, PROTOCOL_MAJOR, FrameType.MESSAGE, len(body)) + body
    async with stream:
        for _ in range(20):  # one every half second, as long as the releaser takes them
            await stream.send_all(frame)
            await trio.sleep(0.5)


async def non_reader(port: int, source: str, chunks: int) -> None:
    key = Ed25519PrivateKey.generate()
    stream, conn = await raw_session(port, source, key, device_hello(key, f"nr-{id(key)}"))
    wanted = [(0, c) for c in range(min(chunks, 64))]  # 64: a request's most (§7.8)
    for _ in range(4):
        params = GetChunks(app=APP, version=VERSION, chunks=wanted)
        await stream.send_all(conn.send_request("get_chunks", params)[1])
    await hold(stream, 30)


async def watcher(port: int, source: str, operator: Ed25519PrivateKey) -> None:
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="operator",
        peer_id=f"watch-{source}",
        public_key=public_bytes(operator),
    )
    stream, conn = await raw_session(port, source, operator, hello)
    await stream.send_all(conn.send_request("watch", Watch(history=100))[1])
    await hold(stream, 30)


async def chatty(port: int, source: str) -> None:
    key = Ed25519PrivateKey.generate()
    stream, conn = await raw_session(port, source, key, device_hello(key, f"chatty-{id(key)}"))
    async with stream:
        for _ in range(200):
            status = AppStatus(state="error", pid=1, exit_code=1, error="x" * 60_000)
            await stream.send_all(conn.send_notification("app_status", status))
            await trio.sleep(0.05)


async def slot_holder(port: int, source: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    async with stream:
        with trio.move_on_after(30):
            while await stream.receive_some(4096):
                pass


async def strangers(
    port: int, operator: Ed25519PrivateKey, chunks: int, seen: Counter[str]
) -> None:
    """Every stranger of items 3-7, each restarted as soon as it ends (until cancelled).

    ``seen`` counts runs started and how they ended, by kind:
    ``declarer:started``, ``slot_holder:OSError``... (so a run shows the
    strangers really ran).
    """

    async def again(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        while True:
            seen[f"{fn.__name__}:started"] += 1
            try:
                await fn(port, *args)
                seen[f"{fn.__name__}:ok"] += 1
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as e:
                seen[f"{fn.__name__}:{type(e).__name__}"] += 1
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        for i, source in enumerate(SOURCES):
            nursery.start_soon(again, declarer, source)
            nursery.start_soon(again, non_reader, source, chunks)
            nursery.start_soon(again, non_reader, source, chunks)
            if i < 2:
                nursery.start_soon(again, watcher, source, operator)
        for source in HOLDER_SOURCES:
            for _ in range(16):
                nursery.start_soon(again, slot_holder, source)
        nursery.start_soon(again, niller, SOURCES[0])
        nursery.start_soon(again, chatty, SOURCES[1])


# --- the honest device --------------------------------------------------------------------


async def probe(port: int, key: Ed25519PrivateKey) -> float:
    """Seconds for connect + handshake + check_update."""
    start = time.perf_counter()
    with trio.fail_after(30):
        async with dial(("127.0.0.1", port), key, device_hello(key, "honest"), timeout=30) as link:
            await link.peer.request(
                "check_update", CheckUpdate(app=APP, version="0.9.0"), timeout=30
            )
    return time.perf_counter() - start


async def download(port: int, key: Ed25519PrivateKey) -> float:
    """MiB/s of one download of the release (every chunk read and kept)."""
    with trio.fail_after(120):
        async with dial(("127.0.0.1", port), key, device_hello(key, "honest"), timeout=30) as link:
            peer = link.peer
            result = await peer.request("get_manifest", GetManifest(app=APP, version=VERSION))
            manifest = Manifest.from_bytes(result.manifest.signed)
            wanted = [(0, c) for c in range(len(manifest.files[0].chunks))]
            start = time.perf_counter()
            got = 0
            for i in range(0, len(wanted), 8):
                stream, done = await peer.request_chunks(
                    GetChunks(app=APP, version=VERSION, chunks=wanted[i : i + 8])
                )
                async for chunk in stream:
                    got += len(chunk.payload)
                await done()
            return got / MIB / (time.perf_counter() - start)


def summary(latencies: list[float], rates: list[float]) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)
    return {
        "probes": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1),
        "max_ms": round(ms[-1], 1),
        "download_mib_s": [round(r, 1) for r in rates],
        "download_mib_s_median": round(statistics.median(rates), 1),
    }


def start_strangers(port: int, operator: Ed25519PrivateKey, size: int) -> subprocess.Popen[str]:
    """The strangers in their own process, so their client-side CPU is not the honest device's."""
    env = dict(os.environ, FP_BENCH_OPERATOR=operator.private_bytes_raw().hex())
    return subprocess.Popen(
        [sys.executable, "-P", __file__, "--strangers", str(port), "--size", str(size)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def stop_strangers(proc: subprocess.Popen[str]) -> Counter[str]:
    """Tell the strangers' process to stop (close its stdin); how their runs ended."""
    try:
        out, _ = proc.communicate(input="", timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return Counter({"strangers process killed": 1})
    if proc.returncode != 0:
        return Counter({f"strangers process failed ({proc.returncode})": 1})
    return Counter(json.loads(out or "{}"))


async def strangers_main(port: int, size: int) -> None:
    """``--strangers`` mode: run the strangers until stdin closes (at most 10 minutes)."""
    operator = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(os.environ["FP_BENCH_OPERATOR"]))
    seen: Counter[str] = Counter()
    with trio.move_on_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(strangers, port, operator, size, seen)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()
    print(json.dumps(seen + HANDSHAKEN))


async def run(port: int, operator: Ed25519PrivateKey, args: argparse.Namespace) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    await probe(port, key)  # enrol the honest device first
    await download(port, key)  # and warm the chunk cache for both phases alike
    seen: Counter[str] = Counter()
    per_phase = max(1, args.probes // (2 * args.rounds))
    phases: dict[str, tuple[list[float], list[float]]] = {"quiet": ([], []), "loaded": ([], [])}
    for _ in range(args.rounds):
        for name in ("quiet", "loaded"):
            latencies, rates = phases[name]
            proc = None
            if name == "loaded":
                proc = start_strangers(port, operator, args.size)
                await trio.sleep(3.0)  # let them take their slots and stall
            try:
                for _ in range(per_phase):
                    latencies.append(await probe(port, key))
                    await trio.sleep(0.02)
                rates.append(await download(port, key))
            finally:
                if proc is not None:
                    seen.update(await trio.to_thread.run_sync(stop_strangers, proc))
            await trio.sleep(1.0)  # the releaser drops what the strangers left
    quiet, loaded = (summary(*phases[n]) for n in ("quiet", "loaded"))
    ratio = loaded["download_mib_s_median"] / quiet["download_mib_s_median"]
    return {
        "quiet": quiet,
        "loaded": loaded,
        "download_ratio": round(ratio, 2),
        "strangers": dict(sorted(seen.items())),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=200, help="honest probes in all (200)")
    parser.add_argument("--size", type=int, default=32, help="release size in MiB (32)")
    parser.add_argument("--rounds", type=int, default=2, help="quiet/loaded pairs (2)")
    parser.add_argument("--strangers", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.strangers is not None:  # the child process of start_strangers
        trio.run(strangers_main, args.strangers, args.size)
        return 0
    operator = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="fp-strangers-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "blob").write_bytes(os.urandom(args.size * MIB))
        data_dir = Path(tmp) / "data"
        publish_release(data_dir, src, app=APP, version=VERSION, signing_keys=[])
        store = ReleaseStore.open(data_dir)
        try:
            store.set_status(APP, VERSION, "pre-released", "bench")
            store.set_status(APP, VERSION, "approved", "bench")
        finally:
            store.close()
        fleetpush = str(Path(sys.executable).with_name("fleetpush"))
        proc = subprocess.Popen(
            [fleetpush, "server", "--insecure", "--listen", "127.0.0.1:0",
             "--data-dir", str(data_dir), "--operator-key", public_bytes(operator).hex(),
             "--send-timeout", "10", "--handshake-timeout", "10", "--frame-timeout", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            port = 0
            for line in proc.stdout:
                if line.startswith("listening on"):
                    port = int(line.rsplit(":", 1)[1])
                    break
            if not port:
                print("the releaser did not start", file=sys.stderr)
                return 1
            result = trio.run(run, port, operator, args)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        result["releaser_alive_until_the_end"] = proc.returncode in (0, -15)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
