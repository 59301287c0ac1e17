"""The ceiling a download cannot beat, measured right before each download.

issue 14, item 5: the old baseline received the network into a *new file*;
on this VM memory left free for more than ~2 s goes back to the host
(virtio-balloon free page reporting), so writing into fresh pages pays host
faults and the baseline swung 7.4x run to run. So the three limits are
measured apart, each in a state the download will meet too:

- :func:`network_rate`: the file sent by another process over loopback
  (``socket.sendfile``) and received into one reused 1 MiB buffer, thrown
  away: the network alone, no disk.
- :func:`disk_write_rate`: ``size`` bytes from memory written into a *new*
  file in the download's destination filesystem, then fsynced and removed:
  the pages it gets are in the same state as the pages the download gets
  right after it.
- :func:`hash_rate`: this machine's single-thread digest rate.

``ceiling = min(network, disk, hash)``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from fleetpush.protocol.hashing import new_hasher

from .baseline import RECV_SIZE, BenchError


def network_rate(path: Path, *, timeout: float = 600.0) -> float:
    """Send ``path`` over loopback from a child process into /dev/null; bytes/s.

    Raises :class:`BenchError`.
    """
    size = path.stat().st_size
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
        with conn:
            conn.settimeout(timeout)
            while received < size:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                received += n
        elapsed = time.perf_counter() - start
        if received != size:
            raise BenchError(f"network baseline: received {received} of {size} bytes")
        if child.wait(timeout) != 0:
            raise BenchError(f"network baseline: the sender exited {child.returncode}")
    except OSError as e:
        raise BenchError(f"network baseline failed: {e}") from e
    finally:
        listener.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    return size / elapsed


def disk_write_rate(dest_dir: Path, size: int) -> float:
    """Write ``size`` bytes into a new file in ``dest_dir``, fsync it, remove it; bytes/s.

    Raises :class:`BenchError`.
    """
    buf = os.urandom(RECV_SIZE)
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / "disk-baseline.tmp"
    try:
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = size
            while left > 0:
                left -= os.write(fd, buf[: min(left, RECV_SIZE)])
            os.fsync(fd)
        finally:
            os.close(fd)
        elapsed = time.perf_counter() - start
    except OSError as e:
        raise BenchError(f"disk baseline in {dest_dir} failed: {e}") from e
    finally:
        path.unlink(missing_ok=True)
    return size / elapsed


def hash_rate(total: int, *, algorithm: str = "sha256") -> float:
    """Hash ``total`` bytes (at most 512 MiB) in 1 MiB updates; returns bytes/s."""
    total = max(RECV_SIZE, min(total, 512 * 1024 * 1024))
    buf = os.urandom(RECV_SIZE)
    h = new_hasher(algorithm)
    start = time.perf_counter()
    for _ in range(total // RECV_SIZE):
        h.update(buf)
    h.digest()
    return (total // RECV_SIZE) * RECV_SIZE / (time.perf_counter() - start)
