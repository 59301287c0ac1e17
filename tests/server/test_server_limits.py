"""Slots and descriptors (issue 10, item 7), through a real releaser on 127.0.0.1.

Strangers that connect and never finish their handshake used to hold the
releaser's only connection budget: honest devices got in 1 time in 30. Now
handshakes have their own budget, a per-source cap and a shorter deadline
under pressure. Strangers connect from 127.0.0.2 and 127.0.0.3 (every
127/8 address is loopback on Linux), the honest device from 127.0.0.1.
Also: `fleetpush server` raises its soft descriptor limit, trio's accept loop
backs off on EMFILE, and an unreadable chunk is reported as an I/O error.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from fleetpush.protocol import CloseCode
from fleetpush.protocol.messages import CheckUpdate
from fleetpush.server import ServerConfig
from fleetpush.server.chunks import CacheShare, ChunkCache, ChunkJob, send_chunks
from fleetpush.server.errors import ChunkUnavailable
from fp_releaser import running_releaser
from server_helpers import connect, wait_for

FLEETPUSH = str(Path(sys.executable).with_name("fleetpush"))


async def _stranger(source: str, port: int, closes: list[int | None]) -> None:
    """Connect from ``source``, send nothing, and note the close code we get."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    async with stream:
        data = b""
        with trio.move_on_after(20):
            try:
                while chunk := await stream.receive_some(65536):
                    data += chunk
            except (trio.BrokenResourceError, OSError):
                pass
    # a bye is a small frame; its close code is a big-endian u16 after the header
    closes.append(CloseCode.TOO_MANY_CONNECTIONS if b"too many" in data else None)


def _limits(config: ServerConfig, **kw: Any) -> ServerConfig:
    settings: dict[str, Any] = dict(
        max_connections=8, max_handshaking=8, max_handshaking_per_source=4, handshake_timeout=30.0
    )
    return attrs.evolve(config, **{**settings, **kw})


async def test_strangers_from_one_source_cannot_lock_out_an_honest_device(config) -> None:
    config = _limits(config)
    closes: list[int | None] = []
    with trio.fail_after(30):
        async with running_releaser(config) as handle:
            admission = handle.server.admission
            async with trio.open_nursery() as strangers:
                for _ in range(20):
                    strangers.start_soon(_stranger, "127.0.0.2", handle.port, closes)
                await wait_for(lambda: len(closes) >= 16)
                # four hold a slot each, the rest were turned away at once
                assert admission.handshaking_from("127.0.0.2") == 4
                assert closes.count(CloseCode.TOO_MANY_CONNECTIONS) == 16
                for attempt in range(3):
                    async with connect(handle.port, peer_id=f"honest-{attempt}") as dev:
                        assert dev.status == "accepted"
                        result = await dev.request(
                            "check_update", CheckUpdate(app="demo", version="1.0")
                        )
                        assert result.available is False
                        # authenticated: it left the handshake budget
                        assert admission.authenticated == 1
                        assert admission.handshaking_from("127.0.0.1") == 0
                strangers.cancel_scope.cancel()
            await wait_for(lambda: admission.handshaking == 0)
            await wait_for(lambda: admission.authenticated == 0)
            assert admission.refused["too many handshakes from this address"] == 16


async def test_under_pressure_handshakes_get_the_short_deadline(config) -> None:
    # Six strangers from two sources: once more than half of the 8 handshake
    # slots are taken, the next ones get 0.3 s instead of 30 s to authenticate.
    config = _limits(config, max_handshaking_per_source=3, busy_handshake_timeout=0.3)
    closes: list[int | None] = []
    with trio.fail_after(15):
        async with running_releaser(config) as handle:
            admission = handle.server.admission
            async with trio.open_nursery() as strangers:
                started = 0
                for source in ("127.0.0.2", "127.0.0.3"):
                    for _ in range(3):
                        # one at a time, so which ones came under pressure is known
                        strangers.start_soon(_stranger, source, handle.port, closes)
                        started += 1
                        await wait_for(lambda k=started: admission.handshaking + len(closes) >= k)
                # the two admitted under pressure are gone well before 30 s
                await wait_for(lambda: len(closes) == 2 and admission.handshaking == 4)
                assert closes == [None, None]  # dropped by the deadline, not turned away
                async with connect(handle.port, peer_id="honest") as dev:
                    assert dev.status == "accepted"
                    assert admission.handshaking == 4
                strangers.cancel_scope.cancel()
            await wait_for(lambda: admission.handshaking == 0)


async def test_accept_backs_off_on_emfile(autojump_clock: trio.testing.MockClock) -> None:
    # We rely on trio.serve_listeners sleeping after EMFILE/ENFILE instead of
    # spinning (app.py): at most ~10 accept() calls a second.
    calls = 0

    class Exhausted(trio.abc.Listener[trio.abc.Stream]):
        async def accept(self) -> trio.abc.Stream:
            nonlocal calls
            calls += 1
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        async def aclose(self) -> None:
            pass

    async def handler(stream: trio.abc.Stream) -> None:
        raise AssertionError("nothing is accepted")

    with trio.move_on_after(10):
        await trio.serve_listeners(handler, [Exhausted()])
    assert 50 <= calls <= 110


async def test_an_unreadable_chunk_is_an_io_error_not_a_verification_failure() -> None:
    def load() -> bytes:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    job = ChunkJob(file=0, chunk=0, key=("r", 0, 0), size=10, load=load, what="app.bin chunk 0")

    async def send(job: ChunkJob, data: bytes) -> None:
        raise AssertionError("nothing to send")

    async def finish() -> None:
        raise AssertionError("it failed")

    with pytest.raises(ChunkUnavailable) as e:
        await send_chunks(ChunkCache(0, max_reads=1), [job], send, finish)
    assert "could not be read" in str(e.value)
    assert "Too many open files" in str(e.value)
    assert "verification" not in str(e.value)


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs /proc")
def test_fleetpush_server_raises_its_descriptor_limit(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = min(256, hard)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    proc = subprocess.Popen(
        [FLEETPUSH, "server", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
         "--insecure"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lower,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("listening on"):
                break
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        (row,) = [r for r in limits.splitlines() if r.startswith("Max open files")]
        expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        assert row.split()[3] == expected, row
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert f"open files limit raised from {soft}" in err or soft == hard


async def test_a_session_pins_at_most_its_share_and_reads_ahead_less_under_pressure() -> None:
    cache = ChunkCache(0, max_reads=4)  # the minimum: 8 MiB, a share of 2 MiB
    size = 512 * 1024
    jobs = [
        ChunkJob(file=0, chunk=i, key=("r", 0, i), size=size, load=lambda: b"x" * size, what="c")
        for i in range(16)
    ]
    share = CacheShare()
    most: list[int] = []

    async def send(job: ChunkJob, data: bytes) -> None:
        await trio.sleep(0.01)  # the read-ahead runs as far as it may meanwhile
        most.append(share.pinned)

    async def finish() -> None:
        pass

    await send_chunks(cache, jobs, send, finish, read_ahead=16, share=share)
    assert max(most) == cache.share_bytes  # read ahead up to its share, not past it
    assert share.pinned == 0 and cache.pinned_bytes == 0

    # Under pressure (over half the cache pinned by others) it pins one chunk at a time.
    others = CacheShare()
    held = [await cache.pin(("o", i), size, lambda: b"o" * size, others) for i in range(9)]
    assert cache.under_pressure
    most.clear()
    await send_chunks(cache, jobs, send, finish, read_ahead=16, share=share)
    assert max(most) == size
    for entry in held:
        cache.unpin(entry, others)
    assert cache.pinned_bytes == 0
