"""Requests sent with pre-encoded params (Connection.send_request_encoded)."""

from __future__ import annotations

import pytest
from fleetpush.protocol import LocalProtocolError, RequestReceived, ResponseReceived, State
from fleetpush.protocol import messages as m
from fleetpush.protocol.connection import encode_params
from protocol_helpers import ConnectionPair

COMMAND = m.UpdateCommand(app="demo", version="2.0.0", restart=True, push_id="p-1")


def test_same_bytes_as_the_normal_path() -> None:
    plain = ConnectionPair().handshake()
    encoded = ConnectionPair().handshake()
    params = encode_params(COMMAND)
    for _ in range(3):  # consecutive ids, same bytes each time
        assert encoded.server.send_request_encoded(
            "__force_update__", params
        ) == plain.server.send_request("__force_update__", COMMAND)
    # ids past the fixint range encode differently: still the same
    plain.server._next_id = encoded.server._next_id = 70_000
    assert encoded.server.send_request_encoded(
        "__apply_update__", params
    ) == plain.server.send_request("__apply_update__", COMMAND)


def test_the_request_is_tracked_like_any_other(open_pair: ConnectionPair) -> None:
    params = encode_params(COMMAND)
    rids = []
    for _ in range(2):
        rid, data = open_pair.server.send_request_encoded("__force_update__", params)
        rids.append(rid)
        events = open_pair.deliver(open_pair.server, data)
        assert events == [RequestReceived(id=rid, method="__force_update__", params=COMMAND)]
    assert rids[1] == rids[0] + 1
    assert open_pair.server.outstanding == 2
    events = open_pair.respond(open_pair.client, rids[1], m.Ack(accepted=True))
    assert events == [
        ResponseReceived(id=rids[1], method="__force_update__", result=m.Ack(accepted=True))
    ]
    assert open_pair.server.outstanding == 1
    # a normal request after it gets the next id
    rid, _ = open_pair.server.send_request("__force_update__", COMMAND)
    assert rid == rids[1] + 1


def test_refusals_leave_no_request_behind(open_pair: ConnectionPair) -> None:
    server = open_pair.server
    with pytest.raises(LocalProtocolError):  # wrong params type for the method
        server.send_request_encoded("__force_update__", encode_params(m.Empty()))
    with pytest.raises(LocalProtocolError):  # chunk lists must be tracked
        open_pair.client.send_request_encoded(
            "get_chunks", encode_params(m.GetChunks(app="a", version="1", chunks=[(0, 0)]))
        )
    with pytest.raises(LocalProtocolError):  # the client side may not send it
        open_pair.client.send_request_encoded("__force_update__", encode_params(COMMAND))
    assert server.outstanding == 0
    assert server.send_request("__force_update__", COMMAND)[0] == 1


def test_outstanding_limit_and_state_apply() -> None:
    pair = ConnectionPair(max_outstanding=2).handshake()
    params = encode_params(COMMAND)
    pair.server.send_request_encoded("__force_update__", params)
    pair.server.send_request_encoded("__force_update__", params)
    with pytest.raises(LocalProtocolError):
        pair.server.send_request_encoded("__force_update__", params)
    assert pair.server.outstanding == 2

    fresh = ConnectionPair()  # before the handshake the state machine refuses it
    with pytest.raises(LocalProtocolError):
        fresh.server.send_request_encoded("__force_update__", params)
    assert fresh.server.state is State.AWAIT_HELLO and fresh.server.outstanding == 0
