"""Shared helpers for the hostile protocol tests and scripts/fuzz_campaign.py.

``drive(data)`` is the fuzz target: the first two bytes pick what is fed and
how the rest is split, the remaining bytes go to a frame decoder, a fresh or
handshaken :class:`Connection` of either side, or the msgpack/manifest
decoders. Its invariant (h11's): the input may raise only
:class:`FleetpushError` and must never hang. The campaign script and
tests/hostile/test_hostile_fuzz_regressions.py both call it, so a crash the
campaign finds replays here byte for byte.
"""

from __future__ import annotations

from typing import Any

from fleetpush.protocol import (
    NEED_DATA,
    Connection,
    FleetpushError,
    FrameDecoder,
    LocalProtocolError,
    Manifest,
    RequestReceived,
    Side,
    State,
    codec,
)
from fleetpush.protocol.frames import encode_data_frame_header, encode_message_frame
from fleetpush.protocol.messages import (
    Ack,
    AppStatus,
    Auth,
    AuthResult,
    Bye,
    CheckUpdate,
    CheckUpdateResult,
    DeviceFilter,
    DeviceInfo,
    DeviceList,
    Empty,
    Enrollment,
    Event,
    GetChunks,
    GetChunksResult,
    GetManifest,
    GetManifestResult,
    Hello,
    HelloResult,
    Kind,
    Push,
    PushResult,
    ReleaseFilter,
    ReleaseInfo,
    ReleaseList,
    SetReleaseStatus,
    SignedManifest,
    StatusResult,
    UpdateCommand,
    UpdateProgress,
    Watch,
)

C, S = Side.CLIENT, Side.SERVER

#: A valid params value for every method in the catalogue.
PARAMS: dict[str, Any] = {
    "hello": Hello(
        protocol_version="1.0",
        role="device",
        peer_id="dev-1",
        public_key=b"\x01" * 32,
        app="app",
        version="1.0.0",
        channel="stable",
    ),
    "auth": Auth(signature=b"\x02" * 64),
    "bye": Bye(code=1000, reason="done"),
    "ping": Empty(),
    "status": Empty(),
    "check_update": CheckUpdate(app="app", version="1.0.0"),
    "get_manifest": GetManifest(app="app", version="2.0.0"),
    "get_chunks": GetChunks(app="app", version="2.0.0", chunks=[(0, 0), (0, 1), (1, 0)]),
    "update_progress": UpdateProgress(state="downloading", bytes_done=1, bytes_total=2),
    "app_status": AppStatus(state="running", pid=7),
    "__force_update__": UpdateCommand(app="app", version="2.0.0", restart=True),
    "__apply_update__": UpdateCommand(app="app", version="2.0.0", restart=False),
    "list_devices": DeviceFilter(),
    "set_enrollment": Enrollment(device_id="dev-1", decision="accepted"),
    "list_releases": ReleaseFilter(),
    "set_release_status": SetReleaseStatus(app="app", version="2.0.0", status="approved"),
    "push": Push(app="app", version="2.0.0", mode="force", devices=["dev-1"]),
    "watch": Watch(),
    "event": Event(seq=1, time=0.0, kind="progress", device_id="dev-1"),
}

#: A valid result value for every request method.
RESULTS: dict[str, Any] = {
    "hello": HelloResult(
        protocol_version="1.0", server_id="srv", cid="c1", heartbeat=15.0, nonce=b"\x03" * 32
    ),
    "auth": AuthResult(status="accepted"),
    "ping": Empty(),
    "status": StatusResult(server_id="srv", server_version="0.1.0", uptime=1.0, connected=1),
    "check_update": CheckUpdateResult(available=False),
    "get_manifest": GetManifestResult(
        manifest=SignedManifest(signed=b"\x80", signatures=[]), status="approved"
    ),
    "get_chunks": GetChunksResult(sent=3),
    "__force_update__": Ack(accepted=True),
    "__apply_update__": Ack(accepted=False, reason="busy"),
    "list_devices": DeviceList(devices=[]),
    "set_enrollment": DeviceInfo(
        device_id="dev-1",
        public_key=b"\x01" * 32,
        enrollment="accepted",
        app="app",
        version="1.0.0",
        channel="stable",
        group=None,
        state="idle",
        connected=True,
        first_seen=0.0,
        last_seen=0.0,
    ),
    "list_releases": ReleaseList(releases=[]),
    "set_release_status": ReleaseInfo(
        app="app",
        version="2.0.0",
        sequence=2,
        status="approved",
        created=0.0,
        notes="",
        size=1,
        files=1,
        restart=True,
    ),
    "push": PushResult(push_id="p1", targets=["dev-1"], sent=["dev-1"], queued=[]),
    "watch": Empty(),
}

REQUEST_METHODS = sorted(RESULTS)
NOTIFICATION_METHODS = sorted(set(PARAMS) - set(RESULTS))
ALL_METHODS = sorted(PARAMS)


def other(side: Side) -> Side:
    return S if side is C else C


def envelope(kind: Kind, method: str, rid: int, *, ok: bool = True) -> bytes:
    """A well-formed message frame built without any state machine (a forgery)."""
    if kind is Kind.REQUEST:
        body = [0, rid, method, codec.to_wire(PARAMS[method])]
    elif kind is Kind.NOTIFICATION:
        body = [3, method, codec.to_wire(PARAMS[method])]
    elif kind is Kind.RESPONSE:
        result = RESULTS.get(method, Empty())
        body = [1, rid, codec.to_wire(result)]
    else:
        body = [2, rid, -32601, "forged error", None]
    return encode_message_frame(codec.packb(body))


def data_frame(stream: int, file: int, chunk: int, payload: bytes) -> bytes:
    return encode_data_frame_header(stream, file, chunk, len(payload)) + payload


def pump(src: Connection, dst: Connection, data: bytes, now: float = 0.0) -> list[Any]:
    """Deliver ``data`` to ``dst`` and return its events (honest pairs only)."""
    dst.receive_data(data, now)
    events = []
    while True:
        ev = dst.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)


def handshaken_pair(now: float = 0.0) -> tuple[Connection, Connection]:
    """A client and a server connection that completed hello and auth."""
    client = Connection(C, now=now)
    server = Connection(S, now=now)
    _, data = client.send_request("hello", PARAMS["hello"])
    (ev,) = pump(client, server, data, now)
    assert isinstance(ev, RequestReceived)
    pump(server, client, server.send_response(ev.id, RESULTS["hello"]), now)
    _, data = client.send_request("auth", PARAMS["auth"])
    (ev,) = pump(client, server, data, now)
    pump(server, client, server.send_response(ev.id, RESULTS["auth"]), now)
    assert client.state is State.OPEN and server.state is State.OPEN
    return client, server


def seed_corpus() -> list[bytes]:
    """Valid inputs for every mode of :func:`drive`: real frames of real sessions."""
    client = Connection(C, now=0.0)
    server = Connection(S, now=0.0)
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    _, hello = client.send_request("hello", PARAMS["hello"])
    to_server.append(hello)
    (ev,) = pump(client, server, hello)
    hello_ok = server.send_response(ev.id, RESULTS["hello"])
    to_client.append(hello_ok)
    pump(server, client, hello_ok)
    _, auth = client.send_request("auth", PARAMS["auth"])
    to_server.append(auth)
    (ev,) = pump(client, server, auth)
    auth_ok = server.send_response(ev.id, RESULTS["auth"])
    to_client.append(auth_ok)
    pump(server, client, auth_ok)
    open_to_server: list[bytes] = []
    open_to_client: list[bytes] = []
    for m in REQUEST_METHODS:
        for sender, sink in ((client, open_to_server), (server, open_to_client)):
            try:
                _, data = sender.send_request(m, PARAMS[m])
            except FleetpushError:
                continue
            sink.append(data)
    for m in NOTIFICATION_METHODS:
        for sender, sink in ((client, open_to_server), (server, open_to_client)):
            try:
                sink.append(sender.send_notification(m, PARAMS[m]))
            except FleetpushError:
                continue
    # Chunks answering the first outstanding get_chunks of a handshaken client (stream 1).
    chunks = data_frame(1, 0, 0, b"a" * 100) + data_frame(1, 0, 1, b"b" * 50)
    chunks += data_frame(1, 1, 0, b"c") + envelope(Kind.RESPONSE, "get_chunks", 1)
    open_to_client.append(chunks)
    bomb = encode_message_frame(b"\xdc\x27\x10" * 900)
    seeds: list[bytes] = []
    for split in (0, 1, 7, 200):
        seeds.append(bytes([0, split]) + b"".join(to_server + open_to_server))
        seeds.append(bytes([1, split]) + b"".join(to_client))
        seeds.append(bytes([2, split]) + b"".join(to_server))
        seeds.append(bytes([3, split]) + b"".join(open_to_client))
        seeds.append(bytes([4, split]) + b"".join(open_to_server))
        seeds.append(bytes([2, split]) + bomb)
    for frame in to_server + to_client + open_to_server + open_to_client:
        seeds.append(bytes([3, 0]) + frame)
        seeds.append(bytes([4, 0]) + frame)
        seeds.append(bytes([5, 0]) + frame[8:])
    return seeds


#: Upper bound on events one input may produce; more means a loop that never ends.
MAX_EVENTS = 100_000


def _split(data: bytes, how: int) -> list[bytes]:
    if how == 0 or not data:
        return [data]
    size = (how & 0x3F) + 1
    return [data[i : i + size] for i in range(0, len(data), size)]


def _run_connection(conn: Connection, pieces: list[bytes], eof: bool) -> None:
    events = 0
    now = 0.0
    for piece in [*pieces, b""] if eof else pieces:
        now += 0.001
        conn.receive_data(piece, now)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            events += 1
            assert events < MAX_EVENTS, "next_event() never returned NEED_DATA"
            if isinstance(ev, RequestReceived):
                # Answer at once, as an adapter would; this must never be a misuse.
                result = RESULTS.get(ev.method)
                try:
                    if ev.method == "get_chunks" or result is None:
                        conn.send_error(ev.id, -32603, "fuzz")
                    else:
                        conn.send_response(ev.id, result)
                except LocalProtocolError as e:
                    raise AssertionError(f"answering {ev.method} at once was refused: {e}") from e
        conn.handle_timer(now)
        conn.data_to_send()
    assert isinstance(conn.state, State)


def drive(data: bytes) -> None:
    """The fuzz target. Raises only FleetpushError (expected) or a real bug."""
    if len(data) < 2:
        return
    mode, how = data[0] % 6, data[1]
    payload = data[2:]
    pieces = _split(payload, how)
    eof = bool(how & 0x80)
    try:
        if mode == 0:
            dec = FrameDecoder()
            frames = 0
            for piece in [*pieces, b""] if eof else pieces:
                dec.feed(piece)
                while dec.next_frame() is not None:
                    frames += 1
                    assert frames < MAX_EVENTS
        elif mode in (1, 2):
            _run_connection(Connection(C if mode == 1 else S, now=0.0), pieces, eof)
        elif mode in (3, 4):
            client, server = handshaken_pair()
            if mode == 3:
                # Give the client requests to be answered: stream 1 expects chunks.
                client.send_request("get_chunks", PARAMS["get_chunks"])
                client.send_request("check_update", PARAMS["check_update"])
                _run_connection(client, pieces, eof)
            else:
                server.send_request("__force_update__", PARAMS["__force_update__"])
                _run_connection(server, pieces, eof)
        else:
            codec.unpackb(payload)
            Manifest.from_bytes(payload)
    except FleetpushError:
        pass
