"""Shared helpers for the sans-IO protocol tests (STYLE.md §5).

A plain module with a unique name (tests/ has no packages, so a second
``conftest`` module could shadow this one if tests imported from it).

:class:`ConnectionPair` pipes a client :class:`Connection` to a server one in
memory, with time passed in explicitly, so every test is synchronous.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from fleetpush.protocol import NEED_DATA, Connection, RequestReceived, Side, State, auth, keys
from fleetpush.protocol import messages as m
from fleetpush.protocol.events import ConnectionEvent
from fp_keys import DEVICE_KEY

VECTORS = Path(__file__).resolve().parents[2] / "specs" / "vectors"

DEVICE_PUB = keys.public_bytes(DEVICE_KEY)


def load_vectors(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def load_generator() -> ModuleType:
    """specs/vectors/generate.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "fleetpush_vectors_generate", VECTORS / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drain(conn: Connection) -> list[ConnectionEvent]:
    """Every event ``conn`` can produce from what it was fed, until NEED_DATA."""
    events: list[ConnectionEvent] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        assert not isinstance(event, type(NEED_DATA))
        events.append(event)


class ConnectionPair:
    """A client and a server Connection wired back to back in memory."""

    def __init__(self, now: float = 0.0, **kwargs: Any) -> None:
        self.now = now
        self.client = Connection(Side.CLIENT, now=now, **kwargs)
        self.server = Connection(Side.SERVER, now=now, **kwargs)

    def peer_of(self, conn: Connection) -> Connection:
        return self.server if conn is self.client else self.client

    def deliver(self, sender: Connection, data: bytes) -> list[ConnectionEvent]:
        """Feed ``data`` (sent by ``sender``) to the other end; return its events."""
        receiver = self.peer_of(sender)
        receiver.receive_data(data, self.now)
        return drain(receiver)

    def request(
        self, sender: Connection, method: str, params: object
    ) -> tuple[int, list[ConnectionEvent]]:
        rid, data = sender.send_request(method, params)
        return rid, self.deliver(sender, data)

    def respond(self, responder: Connection, rid: int, result: object) -> list[ConnectionEvent]:
        return self.deliver(responder, responder.send_response(rid, result))

    def auto_replies(self, conn: Connection) -> list[ConnectionEvent]:
        """Deliver what ``conn`` queued on its own (pongs, automatic errors)."""
        return self.deliver(conn, conn.data_to_send())

    def hello(self, role: str = "device") -> m.HelloResult:
        """Run the hello exchange; both ends are then in AWAIT_AUTH."""
        hello = m.Hello(
            protocol_version="1.0", role=role, peer_id="dev-0001", public_key=DEVICE_PUB
        )
        rid, events = self.request(self.client, "hello", hello)
        assert events == [RequestReceived(id=rid, method="hello", params=hello)]
        result = m.HelloResult(
            protocol_version="1.0",
            server_id="releaser-1",
            cid="c-1",
            heartbeat=15.0,
            nonce=b"n" * 32,
        )
        assert self.respond(self.server, rid, result)[0].result == result  # type: ignore[union-attr]
        return result

    def handshake(self, role: str = "device", status: str = "accepted") -> ConnectionPair:
        """Run hello and auth; both ends are then OPEN."""
        result = self.hello(role)
        payload = auth.auth_payload(
            server_id=result.server_id,
            cid=result.cid,
            nonce=result.nonce,
            role=role,
            peer_id="dev-0001",
            public_key=DEVICE_PUB,
        )
        rid, events = self.request(
            self.client, "auth", m.Auth(signature=auth.sign_challenge(DEVICE_KEY, payload))
        )
        assert len(events) == 1
        self.respond(self.server, rid, m.AuthResult(status=status))
        assert self.client.state is State.OPEN and self.server.state is State.OPEN
        return self


def iter_bytes(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]
