"""Handshake deadline, heartbeat ping and idle timeout, driven by fake ``now`` (§6.2)."""

from __future__ import annotations

import pytest
from fleetpush.protocol import (
    CloseCode,
    Connection,
    ConnectionTimeout,
    ResponseReceived,
    Side,
    codec,
)
from fleetpush.protocol import messages as m
from protocol_helpers import ConnectionPair, drain


def test_handshake_deadline() -> None:
    conn = Connection(Side.SERVER, now=100.0, handshake_timeout=10.0)
    assert conn.get_timer() == 110.0
    conn.handle_timer(109.999)
    with pytest.raises(ConnectionTimeout) as info:
        conn.handle_timer(110.0)
    assert info.value.close_code is CloseCode.TIMEOUT


def test_traffic_does_not_extend_the_handshake_deadline() -> None:
    pair = ConnectionPair(now=0.0, handshake_timeout=10.0)
    pair.now = 9.0
    pair.hello()  # progress, but not completion
    assert pair.server.get_timer() == 10.0
    with pytest.raises(ConnectionTimeout):
        pair.server.handle_timer(10.0)


def _open(heartbeat: float = 5.0) -> ConnectionPair:
    pair = ConnectionPair(now=0.0, heartbeat=heartbeat)
    pair.handshake()
    return pair


def test_no_handshake_deadline_once_open() -> None:
    pair = _open()
    pair.server.handle_timer(4.0)  # past nothing: neither timeout nor ping
    assert pair.server.data_to_send() == b""


def test_heartbeat_ping_after_one_quiet_interval() -> None:
    pair = _open(heartbeat=5.0)
    client = pair.client
    assert client.get_timer() == 5.0
    client.handle_timer(4.9)
    assert client.data_to_send() == b""
    client.handle_timer(5.0)
    ping = client.data_to_send()
    assert codec.unpackb(ping[8:])[2:] == ["ping", {}]
    assert client.get_timer() == 15.0  # now only the idle deadline is pending
    client.handle_timer(6.0)
    assert client.data_to_send() == b""  # one heartbeat ping outstanding at a time
    # The server answers by itself; the pong is swallowed and resets the clock.
    pair.now = 6.0
    assert pair.deliver(client, ping) == []
    pair.now = 7.0
    assert pair.auto_replies(pair.server) == []
    assert client.get_timer() == 12.0


def test_idle_timeout_is_three_heartbeats_of_silence() -> None:
    pair = _open(heartbeat=5.0)
    pair.client.handle_timer(5.0)  # ping sent, never answered
    pair.client.handle_timer(14.999)
    with pytest.raises(ConnectionTimeout) as info:
        pair.client.handle_timer(15.0)
    assert info.value.close_code is CloseCode.TIMEOUT


def test_any_received_bytes_count_as_liveness() -> None:
    pair = _open(heartbeat=5.0)
    pair.client.handle_timer(5.0)
    pair.client.data_to_send()
    pair.now = 12.0
    pair.deliver(
        pair.server, pair.server.send_notification("event", m.Event(seq=1, time=0.0, kind="x"))
    )
    pair.client.handle_timer(26.999)  # the deadline moved to 12 + 3 * 5
    with pytest.raises(ConnectionTimeout):
        pair.client.handle_timer(27.0)


def test_an_explicit_ping_gets_its_response() -> None:
    pair = _open()
    rid, events = pair.request(pair.client, "ping", m.Empty())
    assert events == []
    assert pair.auto_replies(pair.server) == [
        ResponseReceived(id=rid, method="ping", result=m.Empty())
    ]


def test_closed_connection_has_no_timer() -> None:
    pair = _open()
    pair.client.close()
    assert pair.client.get_timer() is None
    pair.client.handle_timer(1e9)  # nothing to do, nothing raised
    pair.server.receive_data(b"", 0.0)
    drain(pair.server)
    assert pair.server.get_timer() is None


@pytest.mark.parametrize(
    ("heartbeat", "handshake_timeout"),
    [(1.0, 4.0), (2.0, 7.0), (2.0, 10.0)],
    ids=["1/4", "2/7", "2/10"],
)
def test_a_late_timer_pings_instead_of_dropping(heartbeat: float, handshake_timeout: float) -> None:
    # Issue 9, item 4: an adapter that computed its sleep before OPEN (the
    # handshake deadline) calls handle_timer late. With handshake_timeout >=
    # 3 x heartbeat that call used to fail the connection (1012) although no
    # ping had ever been sent. Now the late call pings, and the peer gets
    # (IDLE_HEARTBEATS - 1) heartbeats to answer.
    pair = ConnectionPair(now=0.0, heartbeat=heartbeat, handshake_timeout=handshake_timeout)
    pair.handshake()
    server = pair.server
    late = handshake_timeout  # where the stale sleep ended
    server.handle_timer(late)
    ping = server.data_to_send()
    assert codec.unpackb(ping[8:])[2:] == ["ping", {}]
    assert server.get_timer() == late + 2 * heartbeat
    server.handle_timer(late + 2 * heartbeat - 0.001)  # still waiting for the pong
    pair.now = late + 0.1
    assert pair.deliver(server, ping) == []
    assert pair.auto_replies(pair.client) == []  # the pong: swallowed, liveness noted
    assert server.get_timer() == pair.now + heartbeat


def test_a_late_ping_unanswered_still_times_out() -> None:
    pair = ConnectionPair(now=0.0, heartbeat=1.0, handshake_timeout=4.0)
    pair.handshake()
    pair.server.handle_timer(4.0)  # late ping
    with pytest.raises(ConnectionTimeout):
        pair.server.handle_timer(6.0)


def test_no_busy_timer_when_no_ping_can_be_sent() -> None:
    # With every request slot taken no heartbeat ping can go out; the timer
    # then points at the idle deadline instead of a past heartbeat instant.
    pair = ConnectionPair(now=0.0, heartbeat=5.0, max_outstanding=1)
    pair.handshake()
    pair.client.send_request("status", m.Empty())
    assert pair.client.get_timer() == 15.0
    pair.client.handle_timer(5.0)
    assert pair.client.data_to_send() == b""
    with pytest.raises(ConnectionTimeout):
        pair.client.handle_timer(15.0)


def test_a_side_that_pings_later_leaves_the_pinging_to_the_other() -> None:
    """The releaser pings after 1.25 heartbeats (§6.2, issue 15): a device that
    pings on time keeps both ends alive with one exchange per heartbeat, and
    one that goes quiet is still pinged, then dropped two heartbeats later."""
    pair = ConnectionPair(now=0.0, heartbeat=4.0)
    pair.server = Connection(Side.SERVER, now=0.0, heartbeat=4.0, ping_after=1.25)
    pair.handshake()
    assert pair.server.get_timer() == 5.0
    assert pair.client.get_timer() == 4.0
    pair.now = 4.0
    pair.client.handle_timer(4.0)
    assert pair.deliver(pair.client, pair.client.data_to_send()) == []  # the device's ping
    assert pair.server.get_timer() == 9.0  # moved on: the releaser sent no ping
    pair.server.handle_timer(8.999)
    assert pair.auto_replies(pair.server) == []  # only the pong went out
    assert pair.client.get_timer() == 8.0
    # The device goes quiet: pinged at 9, dropped 2 heartbeats after that ping.
    pair.server.handle_timer(9.0)
    ping = pair.server.data_to_send()
    assert codec.unpackb(ping[8:])[2:] == ["ping", {}]
    pair.server.handle_timer(16.999)
    with pytest.raises(ConnectionTimeout):
        pair.server.handle_timer(17.0)
