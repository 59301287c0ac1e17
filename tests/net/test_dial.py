"""dial(): the one connect path, against a real releaser on 127.0.0.1 (issue 9)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import PROTOCOL_VERSION, ErrorCode, RpcError
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Empty, Hello, StatusResult
from fp_keys import DEVICE_KEY, OPERATOR_KEY, fixed_key
from fp_releaser import releaser

from fleetpush.net import AddressError, ClientTls, DialError, dial
from fleetpush.net.tls import make_pki


def operator_hello(key: Ed25519PrivateKey = OPERATOR_KEY) -> Hello:
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        role="operator",
        peer_id="ops",
        public_key=public_bytes(key),
    )


def device_hello() -> Hello:
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id="dev-1",
        public_key=public_bytes(DEVICE_KEY),
        app="demo",
        version="1.0.0",
        channel="stable",
    )


async def _free_port() -> int:
    """A port nobody listens on (bound, then closed)."""
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def test_dial_authenticates_and_closes_the_peer_after_the_block(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with releaser(tmp_path / "data") as handle:
            async with dial(
                f"127.0.0.1:{handle.port}", OPERATOR_KEY, operator_hello(), timeout=5
            ) as link:
                assert link.auth.status == "accepted"
                assert link.hello.server_id and link.hello.cid
                status: StatusResult = await link.peer.request("status", Empty())
                assert status.server_id == link.hello.server_id
                peer = link.peer
            assert peer.closed.is_set()


async def test_dial_takes_a_host_port_pair_and_serves_our_handlers(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with (
            releaser(tmp_path / "data", enrollment="manual") as handle,
            dial(
                ("127.0.0.1", handle.port),
                DEVICE_KEY,
                device_hello(),
                timeout=5,
                heartbeat=2.0,
                name="dev-1 under test",
            ) as link,
        ):
            # a pending device is still connected: what it means is the caller's call
            assert link.auth.status == "pending"
            assert link.peer.name == "dev-1 under test"
            assert link.peer.conn.heartbeat == 2.0


async def test_a_refusal_is_the_rpc_error_itself_not_a_group(tmp_path: Path) -> None:
    stranger = fixed_key("net/test_dial stranger")
    with trio.fail_after(20):
        async with releaser(tmp_path / "data") as handle:
            with pytest.raises(RpcError) as refused:
                async with dial(
                    ("127.0.0.1", handle.port), stranger, operator_hello(stranger), timeout=5
                ):
                    raise AssertionError("an unknown operator key was accepted")
            assert refused.value.code == ErrorCode.AUTH_FAILED


async def test_nobody_listening_is_a_dial_error_naming_the_address() -> None:
    port = await _free_port()
    with trio.fail_after(10), pytest.raises(DialError) as failed:
        async with dial(("127.0.0.1", port), OPERATOR_KEY, operator_hello(), timeout=5):
            raise AssertionError("connected to a closed port")
    assert f"cannot reach the releaser at 127.0.0.1:{port}" in str(failed.value)
    assert "refused" in str(failed.value).lower()


async def test_a_silent_listener_is_a_dial_error_after_the_handshake_timeout() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(DialError, match=r"did not complete the handshake within 0\.3s"):
                async with dial(
                    ("127.0.0.1", port),
                    OPERATOR_KEY,
                    operator_hello(),
                    timeout=5,
                    handshake_timeout=0.3,
                ):
                    raise AssertionError("a silent listener completed a handshake")
            nursery.cancel_scope.cancel()


async def test_a_tls_failure_is_a_dial_error(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with trio.fail_after(20):
        async with releaser(tmp_path / "data") as handle:  # plain TCP
            with pytest.raises(DialError, match="TLS handshake"):
                async with dial(
                    ("127.0.0.1", handle.port),
                    OPERATOR_KEY,
                    operator_hello(),
                    timeout=3,
                    tls=ClientTls(ca_file=pki["ca"]),
                ):
                    raise AssertionError("TLS to a plain releaser succeeded")


async def test_a_bad_address_is_refused_before_any_connect() -> None:
    with pytest.raises(AddressError, match="no host"):
        async with dial(":7878", OPERATOR_KEY, operator_hello(), timeout=1):
            raise AssertionError("dialled an address without a host")
