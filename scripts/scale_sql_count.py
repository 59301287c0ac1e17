"""Count the SQL statements the releaser runs per device action (specs/SCALE.md).

Runs a real releaser in-process (SQLite, a temp data dir, real TCP on
127.0.0.1) with a trace callback on its database connection, and real
device and operator links; after each action the write-behind is flushed
and the statements it caused are counted by kind (SELECT vs writes). The
PostgreSQL backend is being built elsewhere: these are the SQLite backend's
statements, which the storage interface keeps one for one.

    python scripts/scale_sql_count.py [-v]   # one JSON object; -v: the statements too
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import PROTOCOL_VERSION, RequestReceived
from fleetpush.protocol.handshake import hash_capabilities
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Ack, Hello, UpdateProgress
from fleetpush.server import ServerConfig, publish_release, serve

from fleetpush.net.dial import dial
from fleetpush.net.peer import Peer
from fleetpush.operator import connect

APP = "count"


def _kind(sql: str) -> str:
    word = sql.lstrip().split(None, 1)[0].upper()
    if word in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "END"):
        return "txn"  # a commit is what a database pays for: counted apart
    return "read" if word in ("SELECT", "PRAGMA", "WITH") else "write"


async def main(root: Path, verbose: bool) -> dict[str, Any]:
    op_key, rel_key, dev_key = (Ed25519PrivateKey.generate() for _ in range(3))
    src = root / "src"
    src.mkdir()
    (src / "a.txt").write_text("x\n")
    publish_release(root / "data", src, app=APP, version="1.0.1", signing_keys=[rel_key])
    config = ServerConfig(
        data_dir=root / "data",
        port=0,
        operator_keys=[public_bytes(op_key)],
        release_keys=[public_bytes(rel_key)],
        grace_period=1.0,
    )
    seen: collections.Counter[str] = collections.Counter()
    texts: list[str] = []

    def trace(sql: str) -> None:
        seen.update([_kind(sql)])
        texts.append(" ".join(sql.split())[:70])

    got = trio.Event()

    async def on_request(peer: Peer, ev: RequestReceived) -> None:
        await peer.respond(ev.id, Ack(accepted=True))
        got.set()

    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id="dev-1",
        public_key=public_bytes(dev_key),
        app=APP,
        version="1.0.0",
        channel="stable",
        capabilities=hash_capabilities(),
    )
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve, config)
        services = handle.services
        services.conn.set_trace_callback(trace)
        address = ("127.0.0.1", handle.port)

        async def settle(name: str) -> None:
            await trio.sleep(0.3)
            services.writer.flush()
            out[name] = {**dict(seen), "statements": sorted(set(texts))} if verbose else dict(seen)
            seen.clear()
            texts.clear()

        async with connect(address, op_key, name="count") as op:
            await op.approve(APP, "1.0.1")
            await settle("setup")
            for name in ("handshake_new_device", "handshake_known_device"):
                async with dial(address, dev_key, hello, timeout=5, on_request=on_request) as link:
                    await settle(name)
                    peer = link.peer
                await settle(name.replace("handshake", "disconnect"))
            async with dial(address, dev_key, hello, timeout=5, on_request=on_request) as link:
                await settle("reconnect")
                await trio.sleep(0)
                await op.push(app=APP, version="1.0.1", mode="force", all=True)
                await got.wait()
                await settle("push_to_one_device_and_ack")
                peer = link.peer
                for state in ("downloading", "trial", "committed"):
                    await peer.notify(
                        "update_progress", UpdateProgress(state=state, app=APP, version="1.0.1")
                    )
                    await settle(f"progress_{state}")
                await trio.sleep(2.0)
                await settle("idle_2s")
        await handle.shutdown()
        nursery.cancel_scope.cancel()
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        doc = trio.run(main, Path(tmp), "-v" in sys.argv)
    json.dump(doc, sys.stdout, indent=1)
    print()
