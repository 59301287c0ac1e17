"""Regression cases from fuzzing, and hostile msgpack (issue 6).

Every finding of the stateful test and of scripts/fuzz_campaign.py ends up
here as a fixed case, so it can never come back unnoticed.
"""

from __future__ import annotations

import contextlib
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import trio
from fleetpush.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    DecodeError,
    FrameTooLarge,
    LocalProtocolError,
    RemoteProtocolError,
    ResponseReceived,
    Side,
    auth_payload,
    codec,
    sign_challenge,
)
from fleetpush.protocol.frames import encode_message_frame
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.limits import MAX_CONTAINERS, MAX_MESSAGE_BODY, MAX_SERVER_CONTAINERS
from fleetpush.protocol.messages import Auth, Empty, Hello, Watch
from fp_keys import OPERATOR_KEY
from fp_releaser import releaser
from hostile_proto import PARAMS, RESULTS, drive, handshaken_pair, pump

# --- findings of the stateful test -----------------------------------------------------


def test_refused_response_of_wrong_type_keeps_the_request_outstanding() -> None:
    """Found by test_hostile_stateful: send_response popped the request, then refused."""
    client, server = handshaken_pair()
    _, data = client.send_request("status", Empty())
    (ev,) = pump(client, server, data)
    with pytest.raises(LocalProtocolError):
        server.send_response(ev.id, object())
    # The request is still ours to answer, and a correct answer reaches the client.
    (answer,) = pump(server, client, server.send_response(ev.id, RESULTS["status"]))
    assert answer.id == ev.id
    assert client.outstanding == 0


def test_refused_get_chunks_answer_with_chunks_unsent_keeps_the_request() -> None:
    """Found by test_hostile_stateful: the same, for a get_chunks answered too early."""
    client, server = handshaken_pair()
    _, data = client.send_request("get_chunks", PARAMS["get_chunks"])
    (ev,) = pump(client, server, data)
    server.start_chunks(ev.id, [tuple(c) for c in ev.params.chunks])
    with pytest.raises(LocalProtocolError):
        server.send_response(ev.id, RESULTS["get_chunks"])
    with pytest.raises(LocalProtocolError):
        server.send_response(ev.id, RESULTS["get_chunks"])  # still refused, still there
    # An error answer remains possible: the request was not lost.
    (err,) = pump(server, client, server.send_error(ev.id, 8, "unavailable"))
    assert err.id == ev.id


def test_refused_error_answer_after_close_keeps_state() -> None:
    """Found by test_hostile_stateful: send_error popped the request before the transition."""
    client, server = handshaken_pair()
    _, data = client.send_request("status", Empty())
    (ev,) = pump(client, server, data)
    server.close()
    with pytest.raises(LocalProtocolError):
        server.send_error(ev.id, 1, "x")
    assert ev.id in server._theirs


# --- hostile msgpack -------------------------------------------------------------------


def _nested_empty(container: bytes) -> bytes:
    inner = b"\xdc" + struct.pack(">H", 60000) + container * 60000
    n = (MAX_MESSAGE_BODY - 16) // len(inner)
    return b"\xdc" + struct.pack(">H", n) + inner * n


HOSTILE_MSGPACK = {
    "header bomb: 900 nested array16 headers declaring 10,000 items": b"\xdc\x27\x10" * 900,
    "nesting 100,000 deep": b"\x91" * 100_000 + b"\xc0",
    "nesting just past the limit (33)": b"\x91" * 33 + b"\xc0",
    "str32 declaring 4 GiB": b"\xdb\xff\xff\xff\xff" + b"a" * 10,
    "bin32 declaring 4 GiB": b"\xc6\xff\xff\xff\xff" + b"a" * 10,
    "array32 declaring 4 billion items": b"\xdd\xff\xff\xff\xff" + b"\xc0" * 10,
    "map32 declaring 4 billion pairs": b"\xdf\xff\xff\xff\xff" + b"\xa1a\xc0" * 10,
    "ext type": b"\xd4\x01\x00",
    "map with a binary key": b"\x81\xc4\x01k\x01",
    "map with a duplicate key": b"\x82\xa1k\x01\xa1k\x02",
    "map with an integer key": b"\x81\x01\x01",
    "invalid utf-8 string": b"\xa2\xff\xfe",
    "reserved byte 0xc1": b"\xc1",
    "two values": b"\xc0\xc0",
    # Found while writing these: ~600 MB and 34 s before MAX_CONTAINERS existed.
    "8 MiB of nested empty arrays (container amplification)": _nested_empty(b"\x90"),
    "8 MiB of nested empty maps (container amplification)": _nested_empty(b"\x80"),
}


@pytest.mark.parametrize("body", list(HOSTILE_MSGPACK.values()), ids=list(HOSTILE_MSGPACK))
def test_hostile_msgpack_is_refused_cheaply(body: bytes) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DecodeError):
            codec.unpackb(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    # Bounded by the container budget: far below the ~600 MB of the unbounded decode.
    assert peak < 40 * MAX_CONTAINERS * 8, f"peak {peak / 1e6:.1f} MB"
    assert elapsed < 10, f"{elapsed:.1f}s"


@pytest.mark.parametrize("body", list(HOSTILE_MSGPACK.values()), ids=list(HOSTILE_MSGPACK))
def test_hostile_msgpack_over_the_wire_closes_with_a_remote_error(body: bytes) -> None:
    """The same bodies as message frames to a handshaken server: a remote error, nothing else."""
    _, server = handshaken_pair()
    if len(body) > server._max_message_body:
        pytest.skip("larger than a message frame")
    server.receive_data(encode_message_frame(body), 1.0)
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_header_bomb_before_the_handshake_is_refused_by_frame_size() -> None:
    """Before auth only 64 KiB frames are accepted: an 8 MiB body never gets buffered."""
    fresh = Connection(Side.SERVER, now=0.0)
    fresh.receive_data(encode_message_frame(_nested_empty(b"\x90"))[:64], 0.0)
    with pytest.raises(FrameTooLarge):
        fresh.next_event()
    assert fresh.buffered_bytes <= 64


# --- findings of scripts/fuzz_campaign.py ------------------------------------------------

#: Inputs saved by the campaign (hex, as in findings/crash-*.txt), each with what it broke.
CAMPAIGN_FINDINGS: dict[str, str] = {}


@pytest.mark.parametrize(
    "data", list(CAMPAIGN_FINDINGS.values()) or [""], ids=list(CAMPAIGN_FINDINGS) or ["none"]
)
def test_campaign_findings_only_raise_fleetpush_errors(data: str) -> None:
    drive(bytes.fromhex(data))


def test_campaign_seed_corpus_runs_clean() -> None:
    from hostile_proto import seed_corpus

    for seed in seed_corpus():
        drive(seed)


# --- findings of the live campaign (scripts/fuzz_campaign.py --engine live) -------------


async def _operator_session(port: int) -> tuple[trio.SocketStream, Connection]:
    """A raw socket authenticated as the operator (specs/PROTOCOL.md §5), no reader task."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = Connection(Side.CLIENT, now=trio.current_time())

    async def answer() -> Any:
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                data = await stream.receive_some(65536)
                assert data, "the releaser closed during the handshake"
                conn.receive_data(data, trio.current_time())
            elif isinstance(ev, ResponseReceived):
                return ev.result

    hello = Hello(
        protocol_version=PROTOCOL_VERSION, role="operator", peer_id="ops",
        public_key=public_bytes(OPERATOR_KEY),
    )  # fmt: skip
    await stream.send_all(conn.send_request("hello", hello)[1])
    res = await answer()
    payload = auth_payload(
        server_id=res.server_id, cid=res.cid, nonce=res.nonce, role="operator",
        peer_id="ops", public_key=hello.public_key,
    )  # fmt: skip
    auth = Auth(signature=sign_challenge(OPERATOR_KEY, payload))
    await stream.send_all(conn.send_request("auth", auth)[1])
    assert (await answer()).status == "accepted"
    return stream, conn


async def test_watch_dropped_before_its_answer_unsubscribes(tmp_path: Path) -> None:
    """Found by the live campaign: a ``watch`` followed at once by a bad frame.

    The releaser closed the connection on the bad frame, so answering the
    watch raised, after the watcher had subscribed and before the task that
    unsubscribes it was spawned: every such session left a dead queue in the
    event hub for ever (RSS +28 MB in 30 s of fuzzing, and every event offered
    to each dead queue). Issue 10, item 6.
    """
    with trio.fail_after(30):
        async with releaser(tmp_path / "data") as handle:
            hub = handle.services.events
            for _ in range(5):
                stream, conn = await _operator_session(handle.port)
                _, watch = conn.send_request("watch", Watch())
                bad = b"XX" + encode_message_frame(b"\xc0")[2:]  # wrong magic (§2.1)
                async with stream:
                    await stream.send_all(watch + bad)
                    with contextlib.suppress(trio.BrokenResourceError, OSError):
                        while await stream.receive_some(65536):
                            pass
            for _ in range(100):
                if hub.watchers == 0:
                    break
                await trio.sleep(0.05)
            assert hub.watchers == 0


def test_over_long_chunk_list_is_refused_before_its_items_are_converted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by the live campaign: get_chunks with 99,999 (file, chunk) pairs.

    Every pair was converted (0.75 s on the releaser's event loop, probes
    waited 0.6-1.2 s) before ``max_len(MAX_CHUNKS_PER_REQUEST)`` refused the
    list. Now the length is checked first: the items are never looked at, and
    the answer is the same invalid-params error. Issue 10, item 4.
    """
    calls = 0
    real = codec._convert

    def counting(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args)

    _, server = handshaken_pair()
    monkeypatch.setattr(codec, "_convert", counting)
    pairs = [[i % 3, i] for i in range(99_999)]
    body = codec.packb([0, 7, "get_chunks", {"app": "a", "version": "1.0", "chunks": pairs}])
    server.receive_data(encode_message_frame(body), 1.0)
    assert server.next_event() is NEED_DATA  # answered by the connection itself
    answer = codec.unpackb(server.data_to_send()[8:])
    assert answer[:3] == [2, 7, -32602]
    assert "must be <= 64: 99999" in answer[3]
    assert calls < 100  # app and version, not the ~300,000 calls of 99,999 pairs


async def test_a_message_of_many_small_arrays_is_refused_by_the_releaser(tmp_path: Path) -> None:
    """Found by the live campaign: 60,000 ``[i % 3, i]`` pairs in any field of a message.

    The releaser decoded all of them (~6 MB of small objects, ~30 ms on the
    event loop each time); objects it allocated meanwhile pinned CPython's
    1 MiB arenas, so its RSS stayed at 1.35x its start after a 60 s campaign
    (8 extra arenas, 447 empty pools in them). Its connections now have the
    lower container budget (MAX_SERVER_CONTAINERS, specs/PROTOCOL.md §10):
    the message closes its connection, and the releaser goes on serving.
    Issue 10.
    """
    pairs = [[i % 3, i] for i in range(60_000)]
    with trio.fail_after(30):
        async with releaser(tmp_path / "data") as handle:
            stream, conn = await _operator_session(handle.port)
            body = codec.packb([0, 9, "status", {"ignored": pairs}])
            closed = None
            async with stream:
                await stream.send_all(encode_message_frame(body))
                # before the fix the releaser answered and kept the connection open
                with trio.move_on_after(10), contextlib.suppress(trio.BrokenResourceError, OSError):
                    while data := await stream.receive_some(65536):
                        conn.receive_data(data, trio.current_time())
                while (ev := conn.next_event()) is not NEED_DATA:
                    if isinstance(ev, ConnectionClosed):
                        closed = ev
            assert closed is not None, "the releaser did not say bye"
            assert f"more than {MAX_SERVER_CONTAINERS} arrays and maps" in closed.reason
            stream, conn = await _operator_session(handle.port)  # still serving
            await stream.aclose()
