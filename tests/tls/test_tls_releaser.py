"""A real releaser serving TLS on 127.0.0.1: operators over TLS, devices over mutual TLS."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from fleetpush.protocol import PROTOCOL_VERSION, ErrorCode, RpcError
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Hello
from fp_keys import OPERATOR_KEY
from fp_releaser import releaser_config, running_releaser

from fleetpush.net.dial import dial
from fleetpush.net.keys import generate_private_key
from fleetpush.net.tls import ClientTls, make_pki, pem_fingerprint
from fleetpush.operator import Unreachable, connect


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"), clients=["dev-1"])


async def _device_handshake(port: int, tls: ClientTls, device_id: str) -> str:
    """The enrollment status the releaser answers; raises its RpcError if it refuses."""
    key = generate_private_key()
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id=device_id,
        public_key=public_bytes(key),
        app="app",
        version="1.0.0",
    )
    async with dial(("127.0.0.1", port), key, hello, tls=tls, timeout=5, name=device_id) as link:
        return link.auth.status


async def test_operator_over_tls_and_pin(pki: dict[str, Path], tmp_path: Path) -> None:
    op = OPERATOR_KEY
    config = releaser_config(
        tmp_path / "data", tls_cert=pki["server_cert"], tls_key=pki["server_key"]
    )
    with trio.fail_after(20):
        async with running_releaser(config) as handle:
            address = ("127.0.0.1", handle.port)
            async with connect(address, op, tls=ClientTls(ca_file=pki["ca"])) as client:
                assert (await client.status()).server_id
            pin = ClientTls(pin_sha256=pem_fingerprint(pki["server_cert"]))
            async with connect(address, op, tls=pin) as client:
                assert (await client.status()).connected == 0
            # A plain-TCP client cannot talk to a TLS releaser.
            with pytest.raises(Unreachable):
                async with connect(address, op, timeout=3) as client:
                    await client.status()


async def test_mutual_tls_binds_device_id(pki: dict[str, Path], tmp_path: Path) -> None:
    config = releaser_config(
        tmp_path / "data",
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca"],
    )
    tls = ClientTls(ca_file=pki["ca"], cert_file=pki["dev-1_cert"], key_file=pki["dev-1_key"])
    with trio.fail_after(20):
        async with running_releaser(config) as handle:
            assert await _device_handshake(handle.port, tls, "dev-1") == "accepted"
            # The same certificate cannot claim another device id.
            with pytest.raises(RpcError) as refused:
                await _device_handshake(handle.port, tls, "dev-2")
            assert refused.value.code == ErrorCode.AUTH_FAILED
            assert "not the claimed id" in refused.value.message
