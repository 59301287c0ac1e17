#!/usr/bin/env python3
"""The fuzzer process of the live campaign (scripts/fuzz_live.py starts it).

``python scripts/fuzz_live_workers.py --port P`` runs K workers that each
open valid sessions (the real handshake of specs/PROTOCOL.md §5, as an
auto-enrolled device or, for workers 1, 5, 9..., as the operator), then send
messages from a corpus of valid ones (§7.9) mutated at the msgpack level (type
swaps, huge integers, deep nesting, dropped and unknown fields, other methods
and envelopes, duplicate keys, long lists), at the byte level (the mutate
engine's flips and cuts), at the frame level (§2: length field lies, bad
magic/version/type, duplicated, reordered, split and DATA frames), and a
fraction of raw garbage; they reconnect whenever the releaser drops them.
Deterministic per ``--seed`` (the mutation stream; timing is not), bounded by
``--seconds``, 127.0.0.1 only. Prints its counters as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _p in ("tests/hostile", "tests/support"):
    if str(HERE.parent / _p) not in sys.path:
        sys.path.insert(0, str(HERE.parent / _p))

import msgpack  # noqa: E402
import trio  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from fleetpush.protocol import (  # noqa: E402
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    ResponseReceived,
    Side,
    auth_payload,
    codec,
    sign_challenge,
)
from fleetpush.protocol.frames import HEADER, MAGIC, PROTOCOL_MAJOR  # noqa: E402
from fleetpush.protocol.keys import public_bytes  # noqa: E402
from fleetpush.protocol.messages import Auth, Hello  # noqa: E402
from fp_keys import OPERATOR_KEY, fixed_key  # noqa: E402
from fuzz_campaign import mutate_bytes  # noqa: E402

APP = "fuzz"
OLD, NEW = "1.0.0", "2.0.0"
HOST = "127.0.0.1"

# --- the corpus: valid messages of each role (specs/PROTOCOL.md §7.9) ---------------------


def device_ids(workers: int) -> list[str]:
    return [f"fuzz-dev-{w}" for w in range(workers)]


def corpus(role: str, workers: int) -> list[list[Any]]:
    """Valid envelopes (§3.1) in wire form; request ids are filled in when sent."""
    devs = device_ids(workers)
    common: list[list[Any]] = [[0, 0, "ping", {}], [0, 0, "status", {}]]
    if role == "device":
        return [
            *common,
            [0, 0, "check_update", {"app": APP, "version": OLD, "channel": "stable"}],
            [0, 0, "get_manifest", {"app": APP, "version": NEW}],
            [0, 0, "get_chunks", {"app": APP, "version": NEW, "chunks": [[0, 0], [1, 0]]}],
            [3, "update_progress", {
                "state": "downloading", "app": APP, "version": NEW, "push_id": "",
                "bytes_done": 10, "bytes_total": 100, "error": None}],
            [3, "app_status", {
                "state": "running", "pid": 7, "uptime": 1.0, "exit_code": None,
                "error": None, "log_tail": ["started"]}],
            [1, 0, {"accepted": True, "reason": None}],
        ]  # fmt: skip
    return [
        *common,
        [0, 0, "list_devices", {"app": None, "group": None}],
        [0, 0, "list_releases", {"app": None}],
        [0, 0, "watch", {"history": 0}],
        [0, 0, "push", {
            "app": APP, "version": NEW, "mode": "force", "restart": None,
            "devices": devs[:2], "group": None, "all": False}],
        [0, 0, "set_enrollment", {"device_id": devs[0], "decision": "accepted"}],
        # approved -> approved (a no-op or a refusal): never revoke what the prober needs.
        [0, 0, "set_release_status", {"app": APP, "version": NEW, "status": "approved"}],
    ]  # fmt: skip


METHODS = [
    "hello", "auth", "bye", "ping", "status", "check_update", "get_manifest", "get_chunks",
    "update_progress", "app_status", "__force_update__", "__apply_update__", "list_devices",
    "set_enrollment", "list_releases", "set_release_status", "push", "watch", "event", "nope",
]  # fmt: skip
HUGE = [2**63, 2**64 - 1, -(2**63), 2**32, 2**31, -1, 2**53 + 1]
_MARK = "\x00fuzz-mark\x00"


def _value(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, -1, 1.5, math.nan, math.inf, "", "x" * rng.randint(1, 300),
        b"\x00" * rng.randint(1, 64), [], {}, [1, [2, [3]]], {"a": {"b": 1}}, rng.choice(HUGE),
    ])  # fmt: skip


def _frame(body: bytes, ftype: int = 1, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return HEADER.pack(MAGIC, PROTOCOL_MAJOR, ftype, n & 0xFFFFFFFF) + body


class Mutator:
    """One worker's deterministic stream of (label, bytes) to send."""

    def __init__(self, rng: random.Random, role: str, workers: int) -> None:
        self.rng = rng
        self.base = corpus(role, workers)
        self.bodies = [codec.packb(m) for m in self.base]
        self.rid = 10

    def valid(self, msg: list[Any]) -> bytes:
        return _frame(codec.packb(self._with_rid(msg)))

    def _with_rid(self, msg: list[Any]) -> list[Any]:
        msg = json_copy(msg)
        if msg[0] in (0, 1):
            self.rid += 1
            msg[1] = self.rid
        return msg

    def next(self) -> tuple[str, bytes]:
        rng = self.rng
        msg = self._with_rid(rng.choice(self.base))
        r = rng.random()
        if r < 0.25:
            return "valid", _frame(codec.packb(msg))
        if r < 0.60:
            label, body = self._object(msg)
            return label, _frame(body)
        if r < 0.78:
            body = mutate_bytes(rng, bytearray(codec.packb(msg)), self.bodies)
            return "bytes", _frame(bytes(body))
        if r < 0.95:
            return self._frames(msg)
        n = rng.choice((1, 7, 64, 1024, 4096))
        junk = rng.randbytes(n)
        return "garbage", (
            HEADER.pack(MAGIC, PROTOCOL_MAJOR, 1, n) + junk
        ) if rng.random() < 0.5 else junk

    def _object(self, msg: list[Any]) -> tuple[str, bytes]:
        """msgpack-level mutations of the envelope or its params."""
        rng = self.rng
        op = rng.choice(
            (
                "type",
                "huge",
                "deep",
                "drop",
                "extra",
                "method",
                "kind",
                "rid",
                "list",
                "dupkey",
                "len",
            )
        )
        params = msg[-1] if isinstance(msg[-1], dict) else None
        key = rng.choice(sorted(params)) if params else None
        splice = b""
        if op == "type" and key is not None and params is not None:
            params[key] = _value(rng)
        elif op == "huge":
            if key is not None and params is not None:
                params[key] = rng.choice(HUGE)
            else:
                msg[min(1, len(msg) - 1)] = rng.choice(HUGE)
        elif op == "deep":
            depth = rng.choice((8, 33, 64, 1000, 100_000))
            opener = b"\x91" if rng.random() < 0.7 else b"\x81\xa1k"
            splice = opener * depth + b"\xc0"
            if key is not None and params is not None:
                params[key] = _MARK
            else:
                msg[-1] = _MARK
        elif op == "drop" and key is not None and params is not None:
            del params[key]
        elif op == "extra" and params is not None:
            params[rng.choice(("zz", "x" * 40, key or "k"))] = _value(rng)
        elif op == "method" and msg[0] in (0, 3):
            msg[1 if msg[0] == 3 else 2] = rng.choice(METHODS)
        elif op == "kind":
            msg[0] = rng.choice((0, 1, 2, 3, 4, -1, 255, "0"))
        elif op == "rid" and msg[0] in (0, 1):
            msg[1] = rng.choice((0, self.rid - 1, 2**32, 2**64 - 1, -5, "r", None))
        elif op == "list" and params is not None:
            n = rng.choice((100, 5_000, 60_000))
            k = rng.choice(sorted(params)) if params else "chunks"
            params["chunks" if "chunks" in params else k] = [[i % 3, i] for i in range(n)]
        elif op == "dupkey" and key is not None and params is not None:
            splice = b"\x82" + codec.packb(key) + codec.packb(params[key])
            splice += codec.packb(key) + codec.packb(_value(rng))
            msg[-1] = _MARK
        elif op == "len":
            if rng.random() < 0.5 and len(msg) > 1:
                msg.pop()
            else:
                msg.append(_value(rng))
        try:
            body = msgpack.packb(msg, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            return "valid", codec.packb(self._with_rid(self.base[0]))
        if splice:
            body = body.replace(msgpack.packb(_MARK, use_bin_type=True), splice, 1)
        return f"obj:{op}", body

    def _frames(self, msg: list[Any]) -> tuple[str, bytes]:
        """Frame-level mutations (§2): lies in the header, duplicated, reordered, DATA."""
        rng = self.rng
        body = codec.packb(msg)
        op = rng.choice(("short", "long", "header", "dup", "reorder", "data", "cut"))
        if op == "short":
            return "frame:short", _frame(body, length=rng.randint(0, max(0, len(body) - 1)))
        if op == "long":
            extra = rng.choice((1, 100, 65_536, 8 * 1024 * 1024 - len(body), 2**32 - 1 - len(body)))
            return "frame:long", _frame(body, length=len(body) + extra)
        if op == "header":
            h = bytearray(_frame(body))
            i = rng.randrange(4)
            h[i] = rng.choice((0, 2, 3, 0x7F, 0xFF, h[i] ^ 1))
            return "frame:header", bytes(h)
        if op == "dup":
            f = _frame(body)
            return "frame:dup", f * rng.randint(2, 5)
        if op == "reorder":
            frames = [self.valid(rng.choice(self.base)) for _ in range(rng.randint(2, 6))]
            frames.append(_frame(body))
            rng.shuffle(frames)
            return "frame:reorder", b"".join(frames)
        if op == "data":
            payload = rng.randbytes(rng.choice((0, 1, 100, 4096)))
            dh = struct.pack(">III", rng.choice((0, 1, self.rid, 2**32 - 1)), 0, rng.randrange(4))
            return "frame:data", _frame(dh + payload, ftype=2)
        f = _frame(body)
        return "frame:cut", f[: rng.randrange(max(1, len(f)))] + self.valid(msg)


def json_copy(obj: Any) -> Any:
    """A deep copy of a wire value (lists, dicts, scalars)."""
    if isinstance(obj, list):
        return [json_copy(x) for x in obj]
    if isinstance(obj, dict):
        return {k: json_copy(v) for k, v in obj.items()}
    return obj


# --- the fuzzer process -------------------------------------------------------------------


class FuzzStats:
    def __init__(self) -> None:
        self.c: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()


async def _answer(stream: trio.SocketStream, conn: Connection) -> Any:
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError("closed during the handshake")
            conn.receive_data(data, trio.current_time())
            continue
        if isinstance(ev, ResponseReceived):
            return ev.result
        raise EOFError(f"unexpected {type(ev).__name__} during the handshake")


def hello_for(role: str, key: Ed25519PrivateKey, peer_id: str) -> Hello:
    if role == "operator":
        return Hello(
            protocol_version=PROTOCOL_VERSION, role="operator", peer_id=peer_id,
            public_key=public_bytes(key),
        )  # fmt: skip
    return Hello(
        protocol_version=PROTOCOL_VERSION, role="device", peer_id=peer_id,
        public_key=public_bytes(key), app=APP, version=OLD, channel="stable",
    )  # fmt: skip


async def handshake(stream: trio.SocketStream, role: str, key: Ed25519PrivateKey, pid: str) -> str:
    """The hello/auth exchange of §5 over a bare socket; returns the auth status."""
    conn = Connection(Side.CLIENT, now=trio.current_time())
    h = hello_for(role, key, pid)
    await stream.send_all(conn.send_request("hello", h)[1])
    result = await _answer(stream, conn)
    payload = auth_payload(
        server_id=result.server_id, cid=result.cid, nonce=result.nonce,
        role=role, peer_id=pid, public_key=h.public_key,
    )  # fmt: skip
    await stream.send_all(
        conn.send_request("auth", Auth(signature=sign_challenge(key, payload)))[1]
    )
    status: str = (await _answer(stream, conn)).status
    return status


async def drain(stream: trio.SocketStream, stats: FuzzStats) -> None:
    """Read and discard everything (a fuzzer that reads is not a slow reader)."""
    try:
        while data := await stream.receive_some(65536):
            stats.c["bytes_received"] += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def session(
    port: int, w: int, role: str, mut: Mutator, stats: FuzzStats, *, pause: float
) -> None:
    rng = mut.rng
    key = OPERATOR_KEY if role == "operator" else fixed_key(f"fuzz-dev-{w}")
    pid = f"fuzz-op-{w}" if role == "operator" else f"fuzz-dev-{w}"
    stream = await trio.open_tcp_stream(HOST, port)
    stats.c["connections"] += 1
    async with stream, trio.open_nursery() as nursery:
        try:
            if rng.random() < 0.04:  # a few sessions fuzz the handshake itself
                stats.c["handshake_fuzzed"] += 1
                _, garbage = mut.next()
                await stream.send_all(garbage)
                nursery.start_soon(drain, stream, stats)
                await trio.sleep(0.2)
                return
            with trio.fail_after(10):
                status = await handshake(stream, role, key, pid)
            stats.c[f"handshake_{status}"] += 1
            nursery.start_soon(drain, stream, stats)
            for _ in range(rng.randint(1, 200)):
                label, data = mut.next()
                stats.labels[label] += 1
                stats.c["messages"] += 1
                stats.c["bytes_sent"] += len(data)
                with trio.fail_after(10):
                    if rng.random() < 0.05:  # split into small pieces
                        for i in range(0, len(data), 7):
                            await stream.send_all(data[i : i + 7])
                    else:
                        await stream.send_all(data)
                await trio.sleep(rng.random() * pause)
            stats.c["sessions_completed"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, EOFError):
            stats.c["dropped_by_releaser"] += 1
        except trio.TooSlowError:
            stats.c["stalled_10s"] += 1
        except Exception as e:  # a refused handshake answer (RpcError) and the like
            stats.c[f"error:{type(e).__name__}"] += 1
        finally:
            nursery.cancel_scope.cancel()


async def worker(
    port: int, w: int, workers: int, seed: int, stats: FuzzStats, *, pause: float
) -> None:
    # Workers 1, 5, 9... are operators (the key the releaser lists); the rest devices.
    role = "operator" if w % 4 == 1 else "device"
    mut = Mutator(random.Random(seed * 1000 + w), role, workers)
    while True:
        try:
            await session(port, w, role, mut, stats, pause=pause)
        except OSError:
            stats.c["connect_failed"] += 1
            await trio.sleep(0.1)
        await trio.sleep(0.005)


async def fuzz(port: int, workers: int, seconds: float, seed: int, pause: float) -> dict[str, Any]:
    stats = FuzzStats()
    started = time.monotonic()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for w in range(workers):
                nursery.start_soon(partial(worker, port, w, workers, seed, stats, pause=pause))
    return {
        "seconds": round(time.monotonic() - started, 1),
        **dict(sorted(stats.c.items())),
        "mutations": dict(sorted(stats.labels.items())),
    }


def main() -> int:
    """The fuzzer process (started by :func:`run`)."""
    ap = argparse.ArgumentParser(description="live fuzzer workers (started by fuzz_campaign.py)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pause-ms", type=float, default=5.0)
    args = ap.parse_args()
    out = trio.run(fuzz, args.port, args.workers, args.seconds, args.seed, args.pause_ms / 1000)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
