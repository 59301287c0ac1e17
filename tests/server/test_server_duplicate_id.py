"""Two devices with one id (a cloned image): takeovers that ping-pong are stopped (issue 11).

A newer link for a live device id takes over (a half-open link after a
network drop is common); more than TAKEOVER_LIMIT takeovers within
TAKEOVER_WINDOW seconds is two devices fighting over the id: the releaser
keeps the live one, refuses the newcomer with CONFLICT then bye 1014
(specs/PROTOCOL.md §5.5), records a ``duplicate_device_id`` event with both
addresses, and the device backs off instead of retrying at once.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.client.session import DUPLICATE_BACKOFF, ReleaserLink
from fleetpush.protocol import ErrorCode, RpcError
from fleetpush.protocol.messages import Hello
from fleetpush.server import ServerConfig
from fleetpush.server.fleet import TAKEOVER_LIMIT, TAKEOVER_WINDOW, Fleet
from fp_devices import device_config
from fp_releaser import running_releaser
from server_helpers import connect

from fleetpush.cli.output import device_state
from fleetpush.operator import connect as operator_connect

LINK = object()

# name -> (takeover times before, the newcomer's time, refused?)
SCENARIOS: dict[str, tuple[list[float], float, bool]] = {
    "a first connection is never refused": ([], 0.0, False),
    "a reconnect after a network drop takes over": ([0.0], 1.0, False),
    "three takeovers in a minute are still allowed": ([0.0, 1.0], 2.0, False),
    "more than three in a minute: the newcomer backs off": ([0.0, 1.0, 2.0], 3.0, True),
    "the same takeovers spread over more than a minute are fine": (
        [0.0, 1.0, 2.0],
        2.0 + TAKEOVER_WINDOW + 1.0,
        False,
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_takeover_rule(name: str) -> None:
    before, now, refused = SCENARIOS[name]
    fleet = Fleet()
    if before or refused:
        fleet.attach("dev-1", LINK, "10.0.0.1", -10.0)  # type: ignore[arg-type]
    for i, t in enumerate(before):
        fleet.attach("dev-1", LINK, f"10.0.0.{2 + i % 2}", t)  # type: ignore[arg-type]
    dup = fleet.refuse_takeover("dev-1", "10.0.0.9", now)
    assert (dup is not None) == refused
    if dup is not None:
        assert (dup.live, dup.newcomer, dup.takeovers) == ("10.0.0.2", "10.0.0.9", TAKEOVER_LIMIT)
        assert fleet.duplicates["dev-1"] == dup


def test_an_id_that_is_not_live_is_never_refused() -> None:
    fleet = Fleet()
    for t in range(5):
        fleet.attach("dev-1", LINK, "10.0.0.1", float(t))  # type: ignore[arg-type]
    assert fleet.detach("dev-1", LINK)  # type: ignore[arg-type]
    assert fleet.refuse_takeover("dev-1", "10.0.0.2", 5.0) is None


async def test_two_clones_of_one_device_stop_fighting(
    config: ServerConfig, operator_key: Ed25519PrivateKey
) -> None:
    key = Ed25519PrivateKey.generate()  # a cloned image: same id, same key
    with trio.fail_after(30):
        async with running_releaser(config) as server, contextlib.AsyncExitStack() as stack:
            links = [await stack.enter_async_context(connect(server.port, key))]
            for _ in range(TAKEOVER_LIMIT):  # A, B, A, B: each takes over
                links.append(await stack.enter_async_context(connect(server.port, key)))
            live = links[-1]
            with pytest.raises(RpcError) as refused:
                async with connect(server.port, key):
                    pass
            assert refused.value.code == ErrorCode.CONFLICT
            assert "duplicate device id dev-1" in refused.value.message
            assert "back off" in refused.value.message
            # The live clone keeps its session; every earlier one was replaced.
            assert not live.peer.closed.is_set()
            assert all(old.peer.closed.is_set() for old in links[:-1])
            events = server.services.events.history(50, "dev-1")
            [dup] = [e for e in events if e.kind == "duplicate_device_id"]
            assert dup.data["live"] == "127.0.0.1" and dup.data["newcomer"] == "127.0.0.1"
            assert dup.data["takeovers"] == TAKEOVER_LIMIT
            # ... and `devices` shows it.
            async with operator_connect(("127.0.0.1", server.port), operator_key) as op:
                [info] = await op.list_devices()
            assert info.duplicate is not None and "two devices use this id" in info.duplicate
            assert "DUPLICATE ID" in device_state(info)


async def test_the_refused_device_says_so_and_backs_off(
    config: ServerConfig, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    with trio.fail_after(30):
        async with running_releaser(config) as server, contextlib.AsyncExitStack() as stack:
            for _ in range(TAKEOVER_LIMIT + 1):
                await stack.enter_async_context(connect(server.port, key))
            cfg = device_config(tmp_path, server.port)

            def hello() -> Hello:
                return Hello(
                    protocol_version="1.0",
                    role="device",
                    peer_id="dev-1",
                    public_key=link.public_key,
                    app="demo",
                    version="1.0",
                    channel="stable",
                )

            link = ReleaserLink(cfg, key, hello=hello)
            async with trio.open_nursery() as nursery:
                await nursery.start(link.run)
                while link.state != "duplicate":
                    await trio.sleep(0.01)
                assert "duplicate device id dev-1" in link.detail
                # It waits at least half of DUPLICATE_BACKOFF before trying again,
                # not the config's 0.2 s backoff_max.
                connects = link.connects
                await trio.sleep(1.0)
                assert link.state == "duplicate" and link.connects == connects
                nursery.cancel_scope.cancel()
    assert DUPLICATE_BACKOFF >= 30
