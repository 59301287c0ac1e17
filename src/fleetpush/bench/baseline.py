"""The baselines every bench figure is compared with, measured in the same run.

- :func:`raw_tcp`: the same file sent over a plain loopback socket by another
  process (``socket.sendfile``, the kernel's fastest path) and received into
  a file on disk, 1 MiB ``recv_into`` at a time. No framing, no hashing, no
  protocol: what the machine can move from a file to a file over loopback.
- :func:`hash_rate`: this machine's single-thread sha256 rate over 1 MiB
  buffers (what verifying each chunk of a sha256 release costs at best).
"""

from __future__ import annotations

import hashlib
import os
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


def raw_tcp(path: Path, workdir: Path, *, timeout: float = 600.0) -> float:
    """Send ``path`` over loopback from a child process into a file in ``workdir``.

    Returns bytes/s. Raises :class:`BenchError`.
    """
    size = path.stat().st_size
    dest = workdir / "raw-tcp.received"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(timeout)
    port = listener.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, "-m", "fleetpush.bench.baseline", "send", str(path), str(port)],
        stdin=subprocess.DEVNULL,
    )
    try:
        conn, _ = listener.accept()
        start = time.perf_counter()
        received = 0
        buf = bytearray(RECV_SIZE)
        view = memoryview(buf)
        with conn, dest.open("wb", buffering=0) as out:
            conn.settimeout(timeout)
            while received < size:
                n = conn.recv_into(view)
                if n == 0:
                    break
                out.write(view[:n])
                received += n
        elapsed = time.perf_counter() - start
        if received != size:
            raise BenchError(f"raw tcp: received {received} of {size} bytes")
        if child.wait(timeout) != 0:
            raise BenchError(f"raw tcp sender exited {child.returncode}")
    except OSError as e:
        raise BenchError(f"raw tcp baseline failed: {e}") from e
    finally:
        listener.close()
        if child.poll() is None:
            child.kill()
            child.wait()
        dest.unlink(missing_ok=True)
    return size / elapsed


def hash_rate(total: int, *, algorithm: str = "sha256") -> float:
    """Hash ``total`` bytes (at most 512 MiB) in 1 MiB updates; returns bytes/s."""
    total = max(RECV_SIZE, min(total, 512 * 1024 * 1024))
    buf = os.urandom(RECV_SIZE)
    h = hashlib.new(algorithm)
    start = time.perf_counter()
    for _ in range(total // RECV_SIZE):
        h.update(buf)
    h.digest()
    return (total // RECV_SIZE) * RECV_SIZE / (time.perf_counter() - start)


def _send(path: str, port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s, open(path, "rb") as f:
        s.sendfile(f)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "send":
        _send(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m fleetpush.bench.baseline send PATH PORT")
