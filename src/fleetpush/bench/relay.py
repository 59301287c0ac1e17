"""A loopback TCP relay that counts the bytes the releaser sends to a device.

Bytes on the wire for the delta scenarios are counted here, between the
releaser and the device, so they include everything the releaser puts on
the connection: the handshake, every frame header (specs/PROTOCOL.md §3),
the signed manifest, the requests' answers and the chunk payloads. The
releaser's own ``fleetpush_chunk_bytes_served`` counter would miss all but
the payloads, and a device's progress report would miss what it never asked
for. Only the delta scenarios go through the relay: it is a copy in Python
threads (about 1 GB/s here), so the throughput figures go to the releaser
directly. The delta scenarios' times do include it, which costs little
there: a delta moves a few percent of the file.
"""

from __future__ import annotations

import contextlib
import socket
import threading

BUF = 1 << 20


class Relay:
    """Listens on 127.0.0.1 (``port``); forwards every connection to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        #: bytes releaser -> device, and device -> releaser, since reset()
        self.down = 0
        self.up = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.down = self.up = 0

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.down, self.up

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.target, timeout=30)
                upstream.settimeout(None)
            except OSError:
                return
            pair = [client, upstream]
            for args in ((upstream, client, True, pair), (client, upstream, False, pair)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, down: bool, pair: list[socket.socket]
    ) -> None:
        buf = bytearray(BUF)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                # counted before it is passed on: once the device has it, it is counted
                with self._lock:
                    if down:
                        self.down += n
                    else:
                        self.up += n
                dst.sendall(view[:n])
        except OSError:
            pass
        finally:
            # pass the half-close on; the other pump closes its side in turn
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                src.shutdown(socket.SHUT_RD)
            with self._lock:
                pair.append(src)  # the second pump to end closes both sockets
                last = len(pair) == 4
            if last:
                for s in pair[:2]:
                    s.close()
