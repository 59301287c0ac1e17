"""Memory by declaration, against a real ``fleetpush server`` process (issue 10, item 3).

A frame header is 8 bytes; it may declare an 8 MiB body. The releaser used to
allocate the declared length as soon as the header arrived: 300 strangers
(auto-enrolled, so authenticated) sending a header and one body byte each
took it +2.4 GiB, and pending devices got the full 8 MiB limit too. Now a body
buffer grows with the bytes that arrive, pending devices keep the
pre-handshake limits, and the frame deadline ends each partial frame.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import Connection, Side
from fleetpush.protocol.frames import HEADER, MAGIC, PROTOCOL_MAJOR, FrameType
from fleetpush.protocol.limits import MAX_MESSAGE_BODY
from fleetpush.protocol.messages import AppStatus, Empty
from fp_keys import OPERATOR_KEY
from fp_releaser import releaser, start_releaser_process
from hostile_peers import _until_closed, hello, raw_handshake

from fleetpush.net.peer import client_handshake, open_peer
from fleetpush.operator import connect as operator_connect

STRANGERS = 50
MIB = 1024 * 1024

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<pid>/status")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def start(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    return start_releaser_process(
        "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
        "--max-connections", str(STRANGERS + 20), "--frame-timeout", "3", "--insecure", *extra,
    )  # fmt: skip


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(10)
    assert proc.stdout is not None
    proc.stdout.close()


def declaring(n: int) -> bytes:
    """A MESSAGE header declaring ``n`` body bytes, and the first of them."""
    return HEADER.pack(MAGIC, PROTOCOL_MAJOR, FrameType.MESSAGE, n) + b"\x92"


@pytest.mark.slow
async def test_declared_bodies_cost_what_was_sent_and_end_by_themselves(tmp_path: Path) -> None:
    proc, port = start(tmp_path / "data")
    try:
        with trio.fail_after(60):
            streams = [(await raw_handshake(port, f"stranger{i}"))[0] for i in range(STRANGERS)]
            await trio.sleep(0.3)
            before = rss(proc.pid)
            for stream in streams:
                await stream.send_all(declaring(MAX_MESSAGE_BODY))
            await trio.sleep(1.0)  # well inside the 3 s frame deadline
            grown = rss(proc.pid) - before
            # Was 50 x 8 MiB = 400 MiB; now a 64 KiB buffer each.
            assert grown < 40 * MIB, f"releaser grew {grown / MIB:.0f} MiB"
            outcomes = []
            for stream in streams:  # the frame deadline ends every partial frame
                outcomes.append(await _until_closed(stream, 10))
                await stream.aclose()
            assert set(outcomes) <= {"closed", "reset"}, outcomes
            honest, _ = await raw_handshake(port, "honest")  # still serving
            await honest.aclose()
    finally:
        stop(proc)


async def test_a_pending_device_keeps_the_pre_handshake_frame_limit(tmp_path: Path) -> None:
    proc, port = start(tmp_path / "data", "--enrollment", "manual")
    try:
        with trio.fail_after(30):
            stream, _ = await raw_handshake(port, "pending")
            await stream.send_all(declaring(MIB))
            # Refused at the header (bye 1009 FRAME_TOO_LARGE), not held until
            # the 3 s frame deadline.
            assert await _until_closed(stream, 2) in ("closed", "reset")
            await stream.aclose()
    finally:
        stop(proc)


async def test_accepting_a_connected_pending_device_gives_it_the_open_limits(
    tmp_path: Path,
) -> None:
    """The other half: acceptance reaches the live connection's frame limits too."""
    big = AppStatus(state="running", log_tail=["x" * 50_000] * 2)  # a 100 KB body
    with trio.fail_after(20):
        async with releaser(tmp_path / "data", enrollment="manual") as handle:
            stream = await trio.open_tcp_stream("127.0.0.1", handle.port)
            conn = Connection(Side.CLIENT, now=trio.current_time())
            async with open_peer(stream, conn, name="pending") as peer:
                key = Ed25519PrivateKey.generate()
                h = hello(key, "pending-1")
                _, auth = await client_handshake(peer, key, h, timeout=5)
                assert auth.status == "pending"
                async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY) as op:
                    await op.set_enrollment("pending-1", "accepted")
                await peer.notify("app_status", big)
                status = await peer.request("status", Empty(), timeout=5)
                assert status.connected == 1  # still connected after the large frame


async def test_partial_frames_of_all_strangers_share_one_budget(tmp_path: Path) -> None:
    """Strangers that really send bytes are bounded together; the budget comes back."""
    with trio.fail_after(30):
        async with releaser(tmp_path / "data", frame_timeout=1.5) as handle:
            budget = handle.server.services.frame_budget
            budget.limit = 2 * MIB  # the default is 256 MiB; the rule is the same
            streams = [(await raw_handshake(handle.port, f"s{i}"))[0] for i in range(8)]
            for stream in streams:
                # The releaser may close (1009) while we send.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(declaring(MAX_MESSAGE_BODY) + b"\x00" * (400 * 1024))
            await trio.sleep(0.2)
            assert 0 < budget.used <= budget.limit
            outcomes = [await _until_closed(s, 0.05) for s in streams]
            # Those past the budget are closed at once (bye 1009), not at the deadline.
            assert 0 < outcomes.count("still open") < len(streams), outcomes
            # The others hold their share until the frame deadline closes them
            # (no end of stream is fed then): every link gives its share back.
            await wait_until(lambda: budget.used == 0)
            for stream in streams:
                await stream.aclose()
            stream = await trio.open_tcp_stream("127.0.0.1", handle.port)
            conn = Connection(Side.CLIENT, now=trio.current_time())
            async with open_peer(stream, conn, name="honest") as peer:
                key = Ed25519PrivateKey.generate()
                await client_handshake(peer, key, hello(key, "honest-1"), timeout=5)
                big = AppStatus(state="running", log_tail=["x" * 50_000] * 8)  # 400 KB
                await peer.notify("app_status", big)
                status = await peer.request("status", Empty(), timeout=5)
                assert status.connected == 1


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
