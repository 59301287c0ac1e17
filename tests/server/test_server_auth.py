"""Handshake and authentication: keys, enrollment, roles."""

from __future__ import annotations

import attrs
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import CloseCode, ErrorCode, RpcError
from fleetpush.protocol.messages import (
    CheckUpdate,
    DeviceFilter,
    Empty,
    Enrollment,
    ReleaseFilter,
)
from fp_releaser import running_releaser
from server_helpers import connect, wait_for


async def test_wrong_key_for_a_known_device_is_refused(config):
    key = Ed25519PrivateKey.generate()
    with trio.fail_after(10):
        async with running_releaser(config) as server:
            async with connect(server.port, key, peer_id="dev-a") as dev:
                assert dev.status == "accepted"
            with pytest.raises(RpcError) as e:
                async with connect(server.port, Ed25519PrivateKey.generate(), peer_id="dev-a"):
                    pass
            assert e.value.code == ErrorCode.AUTH_FAILED
            async with connect(server.port, key, peer_id="dev-a") as dev:  # the owner still can
                assert dev.status == "accepted"


async def test_unknown_operator_key_is_refused(config, operator_key):
    with trio.fail_after(10):
        async with running_releaser(config) as server:
            with pytest.raises(RpcError) as e:
                async with connect(server.port, Ed25519PrivateKey.generate(), role="operator"):
                    pass
            assert e.value.code == ErrorCode.AUTH_FAILED
            async with connect(server.port, operator_key, role="operator", peer_id="ops") as op:
                assert op.status == "accepted"


async def test_protocol_major_mismatch_names_both_versions(config):
    with trio.fail_after(10):
        async with running_releaser(config) as server:
            with pytest.raises(RpcError) as e:
                async with connect(server.port, protocol_version="2.0"):
                    pass
            assert e.value.code == ErrorCode.VERSION_MISMATCH
            assert "2.0" in e.value.message and "1.1" in e.value.message


async def test_roles_are_separated(config, operator_key):
    with trio.fail_after(10):
        async with running_releaser(config) as server:
            async with connect(server.port) as dev:
                for method, params in [
                    ("list_devices", DeviceFilter()),
                    ("list_releases", ReleaseFilter()),
                    ("set_enrollment", Enrollment(device_id="dev-1", decision="accepted")),
                ]:
                    with pytest.raises(RpcError) as e:
                        await dev.request(method, params)
                    assert e.value.code == ErrorCode.FORBIDDEN
                status = await dev.request("status", Empty())
                assert status.connected == 1
            async with connect(server.port, operator_key, role="operator", peer_id="ops") as op:
                with pytest.raises(RpcError) as e:
                    await op.request("check_update", CheckUpdate(app="demo", version="1.0"))
                assert e.value.code == ErrorCode.FORBIDDEN


async def test_manual_enrollment_pending_until_accepted(config, operator_key):
    config = attrs.evolve(config, enrollment="manual")
    key = Ed25519PrivateKey.generate()
    with trio.fail_after(10):
        async with running_releaser(config) as server:
            async with connect(server.port, key, peer_id="new-1") as dev:
                assert dev.status == "pending"
                with pytest.raises(RpcError) as e:
                    await dev.request("check_update", CheckUpdate(app="demo", version="1.0"))
                assert e.value.code == ErrorCode.PENDING
                async with connect(server.port, operator_key, role="operator", peer_id="ops") as op:
                    devices = (await op.request("list_devices", DeviceFilter())).devices
                    assert [(d.device_id, d.enrollment, d.connected) for d in devices] == [
                        ("new-1", "pending", True)
                    ]
                    info = await op.request(
                        "set_enrollment", Enrollment(device_id="new-1", decision="accepted")
                    )
                    assert info.enrollment == "accepted"
                # takes effect on the live connection at once
                r = await dev.request("check_update", CheckUpdate(app="demo", version="1.0"))
                assert r.available is False
            async with connect(server.port, key, peer_id="new-1") as dev:
                assert dev.status == "accepted"


async def test_rejected_device_is_refused_and_disconnected(config, operator_key):
    config = attrs.evolve(config, enrollment="manual")
    key = Ed25519PrivateKey.generate()
    with trio.fail_after(10):
        async with running_releaser(config) as server:
            async with connect(server.port, key, peer_id="bad-1") as dev:
                async with connect(server.port, operator_key, role="operator", peer_id="ops") as op:
                    await op.request(
                        "set_enrollment", Enrollment(device_id="bad-1", decision="rejected")
                    )
                await dev.peer.wait_closed()
                assert dev.peer.close_code == CloseCode.AUTH_FAILED
            with pytest.raises(RpcError) as e:
                async with connect(server.port, key, peer_id="bad-1"):
                    pass
            assert e.value.code == ErrorCode.REJECTED
            await wait_for(lambda: not server.server.connections)
