"""A stranger on the LAN asks a serving device for chunks (specs/THREATS.md, §7.11).

Run as a script inside a device namespace:

    python stranger.py HOST PORT SERVING_ID APP VERSION

It passes the device handshake with a key of its own (the serving side has no
registry: any key that signs its nonce passes that step), then tries, each on
a fresh link: ``get_chunks`` with no token, and ``present_token`` with a
token naming it and the serving device for the right release, well formed
and unexpired, but signed by its own key instead of the root's timestamp
role. Prints one JSON object: for each try, the error code and message the
serving device answered (or "served").
"""

from __future__ import annotations

import json
import sys
import time

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import PROTOCOL_VERSION, RpcError, keys
from fleetpush.protocol.messages import GetChunks, Hello
from fleetpush.protocol.p2p import PeerToken, PresentToken, sign_peer_token

from fleetpush.net.dial import dial


async def attempt(host: str, port: int, serving: str, app: str, version: str, how: str) -> str:
    me = Ed25519PrivateKey.generate()
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id="stranger",
        public_key=keys.public_bytes(me),
        app=app,
        version="1.0.0",
    )
    now = int(time.time())
    async with dial((host, port), me, hello, timeout=10, name="stranger") as link:
        try:
            if how != "no token":
                token = PeerToken(
                    server_id="not-the-releaser",
                    issued=now - 1,
                    expires=now + 300,
                    asker="stranger",
                    asker_key=keys.public_bytes(me),
                    app=app,
                    version=version,
                    peers=[serving],
                )
                await link.peer.request(
                    "present_token",
                    PresentToken(app=app, version=version, token=sign_peer_token(token, [me])),
                    timeout=10,
                )
            await link.peer.request(
                "get_chunks", GetChunks(app=app, version=version, chunks=[(0, 0)]), timeout=10
            )
        except RpcError as e:
            return f"{e.code}: {e.message}"
    return "served"


async def main(host: str, port: str, serving: str, app: str, version: str) -> None:
    out = {}
    for how in ("no token", "forged"):
        out[how] = await attempt(host, int(port), serving, app, version, how)
    print(json.dumps(out))


if __name__ == "__main__":
    trio.run(main, *sys.argv[1:6])
