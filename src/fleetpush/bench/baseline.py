"""Plain-socket baselines and the bench's payload files.

- :func:`raw_fanout`: the fan-out's baseline. One child process sends the
  same file over ``connections`` loopback connections at once (non-blocking
  ``os.sendfile``, the kernel's fastest path) and this process receives each
  into a new file, fsynced when complete, as a device's download is. No
  framing, no hashing, no protocol: what the machine can move to that many
  disk files over loopback at once.
- The single-connection ceilings (network, disk, hash) are in
  :mod:`fleetpush.bench.ceilings`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from fleetpush.protocol import FleetpushError

RECV_SIZE = 1024 * 1024


class BenchError(FleetpushError):
    """A bench phase could not run or produced a wrong result."""


def make_file(path: Path, size: int, *, seed: int = 0) -> None:
    """Write ``size`` pseudo-random, incompressible bytes to ``path``."""
    block = hashlib.shake_256(f"fleetpush-bench-{seed}".encode()).digest(4 * 1024 * 1024)
    with path.open("wb") as f:
        left = size
        i = 0
        while left > 0:
            # a counter at the head of each block: no two blocks are equal
            piece = (i.to_bytes(8, "little") + block[8:])[:left]
            f.write(piece)
            left -= len(piece)
            i += 1


def raw_fanout(path: Path, connections: int, workdir: Path, *, timeout: float = 900.0) -> float:
    """``path`` to ``connections`` new files over as many loopback connections; bytes/s.

    Raises :class:`BenchError`.
    """
    size = path.stat().st_size
    dest = workdir / "raw-fanout"
    dest.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(min(connections, 4096))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    argv = [sys.executable, "-m", "fleetpush.bench.baseline", "fanout", str(path), str(port)]
    child = subprocess.Popen([*argv, str(connections)], stdin=subprocess.DEVNULL)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    #: connection -> [fd of its file, bytes received]
    files: dict[socket.socket, list[int]] = {}
    done = 0
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    try:
        while done < connections:
            if time.monotonic() > deadline:
                raise BenchError(f"raw fan-out: {done} of {connections} done in {timeout:.0f}s")
            if child.poll() not in (None, 0):
                raise BenchError(f"raw fan-out sender exited {child.returncode}")
            for key, _ in sel.select(1.0):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            conn, _ = listener.accept()
                            conn.setblocking(False)
                            name = dest / f"c{len(files)}"
                            files[conn] = [os.open(name, os.O_WRONLY | os.O_CREAT, 0o600), 0]
                            sel.register(conn, selectors.EVENT_READ, conn)
                    continue
                conn = key.data
                state = files[conn]
                try:
                    n = conn.recv_into(buf)
                except BlockingIOError:
                    continue
                if n:
                    os.write(state[0], view[:n])
                    state[1] += n
                if n == 0 or state[1] >= size:
                    sel.unregister(conn)
                    if state[1] != size:
                        raise BenchError(f"raw fan-out: a connection got {state[1]} of {size}")
                    os.fsync(state[0])
                    done += 1
        elapsed = time.perf_counter() - start
        if child.wait(timeout) != 0:
            raise BenchError(f"raw fan-out sender exited {child.returncode}")
    except OSError as e:
        raise BenchError(f"raw fan-out baseline failed: {e}") from e
    finally:
        sel.close()
        listener.close()
        for conn, (fd, _) in files.items():
            os.close(fd)
            conn.close()
        if child.poll() is None:
            child.kill()
            child.wait()
        shutil.rmtree(dest, ignore_errors=True)
    return size * connections / elapsed


def _send(path: str, port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s, open(path, "rb") as f:
        s.sendfile(f)


def _send_fanout(path: str, port: int, connections: int) -> None:
    """Open ``connections`` connections and sendfile ``path`` into all of them at once."""
    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDONLY)
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
        sel.register(s, selectors.EVENT_WRITE, [s, 0])
    left = connections
    while left:
        for key, _ in sel.select():
            s, offset = key.data[0], key.data[1]
            try:
                n = os.sendfile(s.fileno(), fd, offset, min(size - offset, RECV_SIZE))
            except BlockingIOError:
                continue
            key.data[1] = offset + n
            if key.data[1] >= size:
                sel.unregister(s)
                s.shutdown(socket.SHUT_WR)
                left -= 1
    for s in socks:
        s.close()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "send":
        _send(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "fanout":
        _send_fanout(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python -m fleetpush.bench.baseline send PATH PORT | fanout PATH PORT N")
