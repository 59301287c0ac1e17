"""Where a device says peers reach it (``get_peers.host``, §7.11): behind NAT the
releaser sees the router, so the device must announce its own LAN address.

The two-site NAT topology (tests/netns/test_p2p_sites.py) shows the failure
with real routers; this pins the choice over a real TCP link on 127.0.0.1.
"""

from __future__ import annotations

import pytest
import trio
from fleetpush.client.p2p_agent import announced_host


async def _link_host(configured: str | None, listen: str) -> tuple[str | None, str]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, lambda s: s.aclose(), listeners)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            local = str(stream.socket.getsockname()[0])
            try:
                return announced_host(configured, listen, stream), local
            finally:
                await stream.aclose()
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("configured", "listen", "expect"),
    [
        pytest.param("192.168.4.9", "0.0.0.0:7879", "192.168.4.9", id="p2p_host wins"),
        pytest.param(None, "10.1.0.7:7879", "10.1.0.7", id="a bound listen address"),
        pytest.param(None, "0.0.0.0:7879", "link", id="wildcard: the link's own address"),
        pytest.param(None, ":7879", "link", id="empty host: the link's own address"),
    ],
)
def test_announced_host(configured: str | None, listen: str, expect: str) -> None:
    got, local = trio.run(_link_host, configured, listen)
    assert got == (local if expect == "link" else expect)
    assert local == "127.0.0.1"
