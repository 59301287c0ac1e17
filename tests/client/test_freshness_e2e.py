"""Freshness and signed commands end to end (specs/PROTOCOL.md §8.6, §7.4).

A real releaser on 127.0.0.1 holding a timestamp key; the real Updater over
TCP, provisioned with a root whose timestamp role lists that key. An
injecting plain-TCP proxy (below) plays the man in the middle.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleet_helpers import InProcessHost
from fleetpush.client import Updater
from fleetpush.client.state import load_state
from fleetpush.protocol import codec, keys
from fleetpush.protocol.frames import FrameDecoder, MessageFrame, encode_message_frame
from fleetpush.protocol.keys import private_key_to_pem
from fleetpush.protocol.messages import UpdateCommand, UpdateProgress
from fleetpush.protocol.root import Role, Root, envelope_to_json, sign_root
from fleetpush.server.roots import publish_root
from fp_devices import device_config
from fp_keys import fixed_key, key_hex
from fp_releaser import approve_in_store, publish, push, releaser
from fp_trees import make_tree

ROOT_KEY, RELEASE, TIMESTAMP, THIEF = (fixed_key(s) for s in (0xB1, 0xB2, 0xB3, 0xB4))
FAR = 4_102_444_800
INJECTED_ID = 0x7FFF0001


def root_file(tmp: Path) -> Path:
    def kid(k: Ed25519PrivateKey) -> str:
        return keys.keyid(k)

    root = Root(
        version=1,
        expires=FAR,
        keys={kid(k): keys.public_bytes(k) for k in (ROOT_KEY, RELEASE, TIMESTAMP)},
        root=Role(keys=[kid(ROOT_KEY)], threshold=1),
        release=Role(keys=[kid(RELEASE)], threshold=1),
        timestamp=Role(keys=[kid(TIMESTAMP)], threshold=1),
    )
    path = tmp / "root-1.json"
    path.write_bytes(envelope_to_json(sign_root(root.to_bytes(), [ROOT_KEY])))
    return path


def setup_releaser(tmp: Path, *versions: str, signer: Ed25519PrivateKey = RELEASE) -> Path:
    data = tmp / "releaser"
    data.mkdir()
    from fleetpush.protocol.root import envelope_from_json

    publish_root(data, envelope_from_json(root_file(tmp).read_bytes()), now=time.time())
    for v in versions:
        src = make_tree(tmp / f"src-{v}", {"app.txt": f"demo {v}\n".encode()})
        publish(data, src, v, keys=[signer], release_keys=[keys.public_bytes(signer)])
        approve_in_store(data, v)
    key = tmp / "timestamp.key"
    key.write_bytes(private_key_to_pem(TIMESTAMP))
    return data


def device(tmp: Path, server: str, *, rooted: bool = True, **kw: Any) -> Updater:
    cfg = device_config(tmp / "dev", server, **kw)
    if rooted:
        cfg = cfg.evolve(trusted_keys=(), root=root_file(tmp))
    else:
        cfg = cfg.evolve(trusted_keys=(key_hex(RELEASE),))
    return Updater(cfg, host=InProcessHost())


class InjectingProxy:
    """Plain TCP between a device and the releaser; :meth:`inject` sends the device a
    request of the proxy's own between two frames, and keeps the answer from the releaser."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self.answers: list[Any] = []
        self._to_device: trio.SocketStream | None = None
        self._lock = trio.Lock()
        self._down = FrameDecoder()
        self.connected = trio.Event()
        #: the releaser's push commands seen going to the device (method, params)
        self.commands: list[tuple[str, Any]] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, device: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.upstream)
        self._to_device, self._down = device, FrameDecoder()
        self.connected.set()
        async with server, device, trio.open_nursery() as n:
            n.start_soon(self._downstream, server, device, n.cancel_scope)
            n.start_soon(self._upstream, device, server, n.cancel_scope)

    async def _downstream(self, src: Any, dst: Any, scope: trio.CancelScope) -> None:
        while data := await src.receive_some(65536):
            async with self._lock:  # forwarded whole, so inject() sees frame boundaries
                self._down.feed(data)
                while (frame := self._down.next_frame()) is not None:
                    if isinstance(frame, MessageFrame):
                        msg = codec.unpackb(frame.body)
                        if msg[0] == 0 and msg[2] == "__force_update__":
                            self.commands.append((msg[2], msg[3]))
                await dst.send_all(data)
        scope.cancel()

    async def _upstream(self, src: Any, dst: Any, scope: trio.CancelScope) -> None:
        decoder = FrameDecoder()
        while data := await src.receive_some(65536):
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                assert isinstance(frame, MessageFrame)  # devices send no DATA frames
                msg = codec.unpackb(frame.body)
                if msg[0] in (1, 2) and msg[1] == INJECTED_ID:
                    self.answers.append(msg)  # ours: the releaser never sees it
                    continue
                await dst.send_all(encode_message_frame(frame.body))
        scope.cancel()

    async def inject(self, method: str, cmd: UpdateCommand | dict[str, Any]) -> Any:
        await self.connected.wait()
        params = cmd if isinstance(cmd, dict) else codec.to_wire(cmd)
        body = codec.packb([0, INJECTED_ID, method, params])
        while True:
            async with self._lock:
                if self._down.buffered == 0:
                    assert self._to_device is not None
                    await self._to_device.send_all(encode_message_frame(body))
                    break
            await trio.sleep(0.01)
        while not self.answers:
            await trio.sleep(0.02)
        return self.answers.pop()


@pytest.mark.parametrize(
    ("case", "rooted", "accepted"),
    [
        ("a device whose root names a timestamp key refuses the injected command", True, False),
        ("control: a legacy trusted_keys device accepts it (the injection works)", False, True),
    ],
)
async def test_injected_force_update_over_plain_tcp(
    tmp_path: Path, case: str, rooted: bool, accepted: bool
) -> None:
    data = setup_releaser(tmp_path, "2.0")
    with trio.fail_after(40):
        async with releaser(data, timestamp_key=tmp_path / "timestamp.key") as handle:
            proxy = InjectingProxy(handle.port)
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.serve)
                updater = device(tmp_path, proxy.port, rooted=rooted)
                async with updater.connected():
                    await updater.session.wait_connected(5)
                    cmd = UpdateCommand(app="demo", version="2.0", restart=True, push_id="evil")
                    answer = await proxy.inject("__force_update__", cmd)
                    assert answer[0] == 1, answer  # a result: an Ack
                    assert answer[2]["accepted"] is accepted, answer
                    if accepted:
                        await load_until(tmp_path, "2.0")
                    else:
                        assert "freshness" in answer[2]["reason"]
                        await trio.sleep(0.5)
                        assert updater.host.applied == []  # type: ignore[attr-defined]
                        # The releaser's own push, signed for this connection, goes through.
                        await push(handle, "2.0")
                        await load_until(tmp_path, "2.0")
                nursery.cancel_scope.cancel()


async def test_a_signed_command_replayed_on_a_later_connection_is_refused(tmp_path: Path) -> None:
    data = setup_releaser(tmp_path, "2.0")
    with trio.fail_after(40):
        async with releaser(data, timestamp_key=tmp_path / "timestamp.key") as handle:
            proxy = InjectingProxy(handle.port)
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.serve)
                updater = device(tmp_path, proxy.port, version="2.0")  # has 2.0 already
                async with updater.connected():
                    await updater.session.wait_connected(5)
                    await push(handle, "2.0")  # signed for this connection; "committed" at once
                    while not proxy.commands:
                        await trio.sleep(0.02)
                method, recorded = proxy.commands[0]
                assert recorded["freshness"] is not None
                proxy.connected = trio.Event()
                async with updater.connected():  # a new connection, a new hello nonce
                    await updater.session.wait_connected(5)
                    answer = await proxy.inject(method, recorded)
                assert answer[2]["accepted"] is False
                assert "another nonce (a replay)" in answer[2]["reason"]
                nursery.cancel_scope.cancel()


async def load_until(tmp: Path, version: str) -> None:
    while load_state(tmp / "dev/state").installed_version != version:
        await trio.sleep(0.05)


async def test_stolen_timestamp_key_gets_zero_installs(tmp_path: Path) -> None:
    # The thief runs a releaser with the real timestamp key, but can sign releases
    # only with a key of its own: its signed push arrives and is refused at the manifest.
    data = setup_releaser(tmp_path, "6.6.6", signer=THIEF)
    seen: list[UpdateProgress] = []
    with trio.fail_after(30):
        async with releaser(data, timestamp_key=tmp_path / "timestamp.key") as handle:
            updater = device(tmp_path, handle.port)
            updater._reporter._on_progress = seen.append
            async with trio.open_nursery() as nursery:
                await nursery.start(updater.run)
                await updater.session.wait_connected(5)
                await push(handle, "6.6.6")
                while not any(p.state == "failed" for p in seen):
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    assert updater.host.applied == []  # type: ignore[attr-defined]
    assert "not signed by any trusted release key" in next(
        p.error or "" for p in seen if p.state == "failed"
    )
    assert load_state(tmp_path / "dev/state").installed_version == "1.0"


async def test_a_frozen_releaser_is_reported_stale_within_expiry_plus_a_heartbeat(
    tmp_path: Path,
) -> None:
    data = setup_releaser(tmp_path)
    # Bounds with room for a loaded CI machine (2 cores, load 10+): a refresh
    # late by more than expiry - heartbeat would be a (true) stale report before
    # the freeze, and the upper bound allows scheduling delay past the
    # heartbeat; the exact rule is pinned without a clock in the pure layer.
    expiry, heartbeat = 4.0, 0.5
    seen: list[tuple[float, str]] = []
    with trio.fail_after(30):
        async with releaser(
            data, timestamp_key=tmp_path / "timestamp.key", freshness_expiry=expiry
        ) as handle:
            updater = device(tmp_path, handle.port, heartbeat=heartbeat)
            updater._reporter._on_progress = lambda p: seen.append((time.time(), p.state))
            async with trio.open_nursery() as nursery:
                await nursery.start(updater.run)
                while "freshness" not in load_state(tmp_path / "dev/state").extra:
                    await trio.sleep(0.05)
                await trio.sleep(2 * expiry)  # kept fresh by get_freshness meanwhile
                assert not any(state == "stale" for _, state in seen)
                # Freeze: the releaser keeps serving, but can no longer sign statements
                # (a mirror or an attacker replaying an old state has no timestamp key).
                handle.services.freshness = None
                frozen_expires = load_state(tmp_path / "dev/state").extra["freshness"]["expires"]
                while not any(state == "stale" for _, state in seen):
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    stale_at = next(t for t, state in seen if state == "stale")
    assert frozen_expires <= stale_at <= frozen_expires + heartbeat + 2.0
