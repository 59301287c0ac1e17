"""Root rotation and fast-forward recovery end to end (specs/PROTOCOL.md §8.4, §8.5).

A real releaser on 127.0.0.1 serves the roots published into its data dir
(server/roots.py, as `fleetpush root publish` does); the device is the real
Updater over TCP, applying in-process (fleet_helpers.InProcessHost). Every
key is a fixed seed: R* sign roots, L* sign releases.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleet_helpers import InProcessHost
from fleetpush.client import Updater
from fleetpush.client.roots import ROOT_FILE
from fleetpush.client.state import load_state
from fleetpush.protocol import keys
from fleetpush.protocol.errors import ExpiredRoot, RollbackRefused, UnknownKey
from fleetpush.protocol.root import Role, Root, envelope_from_json, envelope_to_json, sign_root
from fleetpush.server.roots import publish_root
from fp_devices import device_config
from fp_keys import fixed_key, key_hex
from fp_releaser import approve, publish, releaser
from fp_trees import make_tree

R1, R2, R3 = (fixed_key(s) for s in (0x81, 0x82, 0x83))
L1, L2 = (fixed_key(s) for s in (0x91, 0x92))
FAR = 4_102_444_800  # 2100-01-01


def root_doc(
    version: int,
    root_keys: Sequence[Ed25519PrivateKey],
    release_keys: Sequence[Ed25519PrivateKey],
    signers: Sequence[Ed25519PrivateKey],
    *,
    resets: dict[str, int] | None = None,
    expires: int = FAR,
) -> bytes:
    def kid(k: Ed25519PrivateKey) -> str:
        return keys.keyid(k)

    root = Root(
        version=version,
        expires=expires,
        keys={kid(k): keys.public_bytes(k) for k in (*root_keys, *release_keys)},
        root=Role(keys=[kid(k) for k in root_keys], threshold=len(root_keys)),
        release=Role(keys=[kid(k) for k in release_keys], threshold=1),
        sequence_resets=resets or {},
    )
    return envelope_to_json(sign_root(root.to_bytes(), signers))


def publish_root_file(data_dir: Path, doc: bytes) -> None:
    publish_root(data_dir, envelope_from_json(doc), now=1e9)


def release(tmp: Path, data_dir: Path, version: str, key: Ed25519PrivateKey, **kw: object) -> None:
    src = make_tree(tmp / f"src-{version}", {"app.txt": f"demo {version}\n".encode()})
    publish(data_dir, src, version, keys=[key], **kw)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "releaser"
    d.mkdir()
    return d


def provisioned(tmp_path: Path, port: int, **kw: object) -> Updater:
    """dev-1 provisioned with root v1 (R1, release L1), no trusted_keys."""
    root1 = tmp_path / "root-1.json"
    root1.write_bytes(root_doc(1, [R1], [L1], [R1]))
    # device_config's own first parameter is called root: set the setting afterwards.
    cfg = device_config(tmp_path / "dev", port, **kw).evolve(trusted_keys=(), root=root1)
    return Updater(cfg, host=InProcessHost())


async def test_device_on_v1_walks_v2_and_v3_before_trusting_a_v3_release(
    tmp_path: Path, data_dir: Path
) -> None:
    publish_root_file(data_dir, root_doc(1, [R1], [L1], [R1]))
    publish_root_file(data_dir, root_doc(2, [R2], [L1], [R1, R2]))
    publish_root_file(data_dir, root_doc(3, [R2, R3], [L2], [R2, R3]))  # release key L1 -> L2
    release(tmp_path, data_dir, "2.0", L2, approved=True)
    with trio.fail_after(30):
        async with releaser(data_dir) as handle:
            updater = provisioned(tmp_path, handle.port)
            host = updater.host
            assert updater.ctx.roots.version == 1
            async with updater.connected():
                await updater.update()
            assert host.applied == ["2.0"]  # type: ignore[attr-defined]
            persisted = Root.from_bytes(
                envelope_from_json((tmp_path / "dev/state" / ROOT_FILE).read_bytes()).signed
            )
            assert persisted.version == 3
            # A release signed by L1, removed in v3, is refused after the rotation
            # (published with the old key list, as a releaser that missed the root would).
            release(tmp_path, data_dir, "3.0", L1, release_keys=[keys.public_bytes(L1)])
            await approve(handle, "3.0")
            restarted = provisioned(tmp_path, handle.port)  # provisioned v1, persisted v3
            assert restarted.ctx.roots.version == 3
            async with restarted.connected():
                with pytest.raises(UnknownKey):
                    await restarted.update()
    assert host.applied == ["2.0"]  # type: ignore[attr-defined]
    assert (tmp_path / "dev/app/app.txt").read_text() == "demo 2.0\n"


async def test_a_root_published_while_connected_is_walked_when_its_release_arrives(
    tmp_path: Path, data_dir: Path
) -> None:
    publish_root_file(data_dir, root_doc(1, [R1], [L1], [R1]))
    with trio.fail_after(30):
        async with releaser(data_dir) as handle:
            updater = provisioned(tmp_path, handle.port)
            async with updater.connected():
                await trio.sleep(0.2)  # the hello said root 1
                publish_root_file(data_dir, root_doc(2, [R1], [L2], [R1]))
                release(tmp_path, data_dir, "2.0", L2)
                await approve(handle, "2.0")
                await updater.update()  # UnknownKey under v1 -> probes get_root(2) -> trusts
            assert updater.host.applied == ["2.0"]  # type: ignore[attr-defined]
            assert updater.ctx.roots.version == 2


async def test_legacy_trusted_keys_device_migrates_to_a_root_cosigned_by_its_release_key(
    tmp_path: Path, data_dir: Path
) -> None:
    # Bare trusted_keys [L1] are root v0: root v1 signed by L1 and R1 is accepted.
    publish_root_file(data_dir, root_doc(1, [R1], [L2], [R1, L1]))
    release(tmp_path, data_dir, "2.0", L2, approved=True)
    with trio.fail_after(30):
        async with releaser(data_dir) as handle:
            cfg = device_config(tmp_path / "dev", handle.port, trusted_keys=[key_hex(L1)])
            updater = Updater(cfg, host=InProcessHost())
            assert updater.ctx.roots.version == 0
            async with updater.connected():
                await updater.update()
    assert updater.host.applied == ["2.0"]  # type: ignore[attr-defined]
    assert updater.ctx.roots.version == 1


async def test_fast_forward_strands_a_device_and_a_resetting_root_recovers_it(
    tmp_path: Path, data_dir: Path
) -> None:
    from fp_keys import OPERATOR_KEY

    from fleetpush.operator import connect as operator_connect

    publish_root_file(data_dir, root_doc(1, [R1], [L1], [R1]))
    release(tmp_path, data_dir, "2.0", L1, approved=True)  # sequence 1, legitimate
    # The thief of L1 publishes a release with an inflated sequence.
    inflated = 2**62
    release(tmp_path, data_dir, "6.6.6", L1, sequence=inflated, approved=True)
    with trio.fail_after(60):
        async with releaser(data_dir) as handle:
            updater = provisioned(tmp_path, handle.port)
            async with updater.connected():
                await updater.update()
            assert updater.host.applied == ["6.6.6"]  # type: ignore[attr-defined]
            assert load_state(tmp_path / "dev/state").high_water == inflated
            # The operator revokes it; the legitimate release is now refused: stranded.
            async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY) as op:
                await op.set_release_status("demo", "6.6.6", "revoked")
            async with updater.connected():
                with pytest.raises(RollbackRefused):
                    await updater.update("2.0", forced=True)
            # Recovery without touching the device: root v2 drops L1 for L2 and lowers
            # demo's mark to 1 (the last legitimate sequence); the releaser then takes
            # sequence 2 (the revoked 2**62 above the reset no longer counts), signed by L2.
            publish_root_file(data_dir, root_doc(2, [R1], [L2], [R1], resets={"demo": 1}))
            release(tmp_path, data_dir, "2.1", L2)
            await approve(handle, "2.1")
            async with updater.connected():
                await updater.update()
            assert updater.host.applied == ["6.6.6", "2.1"]  # type: ignore[attr-defined]
    state = load_state(tmp_path / "dev/state")
    assert (state.installed_version, state.installed_sequence, state.high_water) == ("2.1", 2, 2)
    assert (tmp_path / "dev/app/app.txt").read_text() == "demo 2.1\n"
    # A restart keeps the lowered mark and root v2 (persisted, never re-applied).
    restarted = provisioned(tmp_path, 1)
    assert restarted.ctx.roots.version == 2
    assert restarted.store.state.high_water == 2


async def test_an_expired_root_installs_nothing_until_a_newer_root_is_published(
    tmp_path: Path, data_dir: Path
) -> None:
    import time

    soon = int(time.time()) + 1
    v1 = root_doc(1, [R1], [L1], [R1], expires=soon)
    publish_root_file(data_dir, v1)
    release(tmp_path, data_dir, "2.0", L1, approved=True)
    with trio.fail_after(30):
        async with releaser(data_dir) as handle:
            (tmp_path / "root-1.json").write_bytes(v1)
            cfg = device_config(tmp_path / "dev", handle.port).evolve(
                trusted_keys=(), root=tmp_path / "root-1.json"
            )
            updater = Updater(cfg, host=InProcessHost())
            while time.time() < soon:
                await trio.sleep(0.1)
            async with updater.connected():
                with pytest.raises(ExpiredRoot, match="publish a newer root"):
                    await updater.update()
                assert updater.host.applied == []  # type: ignore[attr-defined]
                # python-tuf's rule: the walk still works past expiry, so a fresh
                # root (signed by the expired one's keys) recovers the device.
                publish_root(
                    data_dir, envelope_from_json(root_doc(2, [R1], [L1], [R1])), now=time.time()
                )
            async with updater.connected():
                await updater.update()
    assert updater.host.applied == ["2.0"]  # type: ignore[attr-defined]


def test_a_damaged_persisted_root_falls_back_to_the_provisioned_one(tmp_path: Path) -> None:
    updater = provisioned(tmp_path, 1)
    state_root = tmp_path / "dev/state" / ROOT_FILE
    state_root.write_bytes(root_doc(2, [R2], [L2], [R1, R2]))
    assert provisioned(tmp_path, 1).ctx.roots.version == 2  # newer, persisted: used
    state_root.write_bytes(b"{not json")
    assert provisioned(tmp_path, 1).ctx.roots.version == 1  # damaged: walk again from v1
    assert updater.ctx.roots.version == 1
