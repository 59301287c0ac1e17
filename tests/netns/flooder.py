"""A peer that floods the device asking it for chunks (specs/THREATS.md, §7.11).

Run as a script where a device announced it serves (its ``p2p_host``):

    python flooder.py HOST PORT DEVICE_ID MODE SRC_DIR CHUNK_SIZE

It answers ``hello``, ``auth`` and ``present_token`` like a serving device
(client/p2p_serve.py's own link code), so the asker gets as far as
``get_chunks``; then, writing raw frames past the protocol core:

* ``more``: the chunks asked (genuine bytes, from SRC_DIR), then DATA frames
  for the chunks after them, without end and without the response;
* ``unrequested``: a DATA frame for a chunk it was not asked for (genuine
  bytes), then the same again without end;
* ``huge``: a DATA header declaring 2 GiB (far over the 4 MiB chunk limit),
  then bytes without end.

Each accepted link is logged as one JSON line when it ends: the mode, the
chunks asked, and the bytes the flooder managed to write before the asker
cut it off.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio
from fleetpush.client.p2p_serve import ServeContext, _Link
from fleetpush.protocol import Connection, Side
from fleetpush.protocol.frames import (
    DATA_HEADER,
    DATA_HEADER_SIZE,
    HEADER,
    MAGIC,
    PROTOCOL_MAJOR,
    FrameType,
    encode_data_frame_header,
)
from fleetpush.protocol.messages import GetChunks
from fleetpush.protocol.p2p import PresentToken

from fleetpush.net.peer import Peer, open_peer

HUGE = 2 << 30


class Flood(_Link):
    def __init__(self, ctx: ServeContext, mode: str, files: list[Path], chunk: int) -> None:
        super().__init__(ctx)
        self.mode, self.files, self.chunk = mode, files, chunk
        self.asked: list[list[int]] = []
        self.written = 0

    def _present(self, params: PresentToken) -> None:
        return None  # any token will do: the point is what follows

    def _bytes(self, file: int, chunk: int) -> bytes:
        with self.files[file].open("rb") as f:
            f.seek(chunk * self.chunk)
            return f.read(self.chunk) or b"\0" * self.chunk

    async def _send(self, peer: Peer, data: bytes) -> None:
        await peer.stream.send_all(data)
        self.written += len(data)

    async def _chunks(self, peer: Peer, rid: int, params: GetChunks) -> None:
        self.asked = [list(c) for c in params.chunks]
        file, chunk = params.chunks[0]
        if self.mode == "huge":
            await self._send(
                peer,
                HEADER.pack(MAGIC, PROTOCOL_MAJOR, FrameType.DATA, DATA_HEADER_SIZE + HUGE)
                + DATA_HEADER.pack(rid, file, chunk),
            )
            while True:
                await self._send(peer, b"\xaa" * (1 << 16))
        if self.mode == "more":
            for f, c in params.chunks:
                data = self._bytes(f, c)
                await self._send(peer, encode_data_frame_header(rid, f, c, len(data)) + data)
            file, chunk = params.chunks[-1]
        # "more" goes on past the last chunk asked; "unrequested" starts there.
        asked = set(params.chunks)
        while True:
            chunk += 1
            if (file, chunk) in asked:
                continue
            data = self._bytes(file, chunk % 4)
            await self._send(peer, encode_data_frame_header(rid, file, chunk, len(data)) + data)


async def main(host: str, port: str, device_id: str, mode: str, src: str, chunk: str) -> None:
    files = sorted(Path(src).iterdir())
    ctx = ServeContext(
        device_id=device_id,
        trust=lambda: None,
        holdings=lambda app, version: None,
        now=lambda: 0.0,
    )

    async def handle(stream: trio.SocketStream) -> None:
        link = Flood(ctx, mode, files, int(chunk))
        conn = Connection(Side.SERVER, now=trio.current_time(), heartbeat=30.0)
        try:
            async with open_peer(stream, conn, name="flood", on_request=link.on_request) as peer:
                await peer.wait_closed()
        except Exception as e:  # the asker cutting us off is the point
            ended = f"{type(e).__name__}: {e}"
        else:
            ended = "closed"
        line = {"mode": mode, "asked": link.asked, "written": link.written, "ended": ended[:200]}
        print(json.dumps(line), flush=True)

    listeners = await trio.open_tcp_listeners(int(port), host=host)
    print(json.dumps({"listening": f"{host}:{port}"}), flush=True)
    await trio.serve_listeners(handle, listeners)


if __name__ == "__main__":
    trio.run(main, *sys.argv[1:7])
