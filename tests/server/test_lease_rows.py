"""Device leases: a device is live on one releaser, and every releaser says which (issue 15, §2).

The decision (server/leases.py ``lost_links``) is a table of scenarios; the
rows are checked on real releasers (``serve`` on 127.0.0.1 port 0): one on
SQLite, where the rows only feed the views, and two sharing one real
PostgreSQL database, where a device that connects to B while A is alive is
closed on A (POLICY, 1014) and both releasers name B.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import CloseCode
from fleetpush.protocol.messages import UpdateProgress
from fleetpush.server import ServerConfig, ServerHandle
from fleetpush.server.leases import (
    ALIVE_FOR,
    LeaseStore,
    Taken,
    advertised_address,
    lost_links,
)
from fleetpush.server.releases import ReleaseStore
from fp_releaser import running_releaser
from server_helpers import connect, publish, wait_for

from fleetpush.operator import connect as operator_connect

ME = "r-me"

# name -> (leases others took, our live device ids, the devices to close)
SCENARIOS: dict[str, tuple[list[Taken], set[str], list[str]]] = {
    "a device another releaser took from us is closed here": (
        [Taken("d1", "r-b", "b:1")], {"d1", "d2"}, ["d1"],
    ),
    "a device not live here is left alone (it left us already)": (
        [Taken("d3", "r-b", "b:1")], {"d1"}, [],
    ),
    "our own lease never closes our link": ([Taken("d1", ME, "me:1")], {"d1"}, []),
    "a device seen twice in one window is closed once": (
        [Taken("d1", "r-b", "b:1"), Taken("d1", "r-c", "c:1")], {"d1"}, ["d1"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_which_links_a_releaser_closes(name: str) -> None:
    taken, live, closed = SCENARIOS[name]
    assert [t.device_id for t in lost_links(taken, live, ME)] == closed


def test_the_address_shown_for_a_wildcard_listener_is_the_host_name() -> None:
    assert advertised_address("127.0.0.1", 7878) == "127.0.0.1:7878"
    assert advertised_address("::1", 7878) == "[::1]:7878"
    assert not advertised_address("0.0.0.0", 7878).startswith("0.0.0.0")


def _lease(handle: ServerHandle, device_id: str) -> str | None:
    """The releaser id the lease row of ``device_id`` names (after queued writes)."""
    services = handle.services
    services.writer.flush()
    row = services.conn.execute(
        "SELECT releaser_id FROM device_leases WHERE device_id = ?", (device_id,)
    ).fetchone()
    return None if row is None else str(row[0])


Listed = dict[str, tuple[bool, str | None]]


async def _listed(handle: ServerHandle, key: Ed25519PrivateKey) -> Listed:
    async with operator_connect(("127.0.0.1", handle.port), key) as op:
        return {d.device_id: (d.connected, d.releaser) for d in await op.list_devices()}


async def test_one_releaser_names_itself_and_frees_the_lease_on_disconnect(
    config: ServerConfig, operator_key: Ed25519PrivateKey
) -> None:
    with trio.fail_after(30):
        async with running_releaser(config) as server:
            me = server.services.leases.releaser_id
            address = f"127.0.0.1:{server.port}"
            async with connect(server.port, peer_id="d-1"):
                await wait_for(lambda: _lease(server, "d-1") == me)
                # the loop announced the releaser within its first round
                await wait_for(lambda: bool(server.services.leases.holders(["d-1"], 0.0)))
                assert await _listed(server, operator_key) == {"d-1": (True, address)}
                async with operator_connect(("127.0.0.1", server.port), operator_key) as op:
                    detail = await op.get_device("d-1")
                assert detail.device.releaser == address
            await wait_for(lambda: _lease(server, "d-1") is None)
            assert await _listed(server, operator_key) == {"d-1": (False, None)}


async def test_a_lease_of_a_releaser_whose_time_ran_out_is_free(
    config: ServerConfig, operator_key: Ed25519PrivateKey
) -> None:
    with trio.fail_after(30):
        async with running_releaser(config) as server:
            services = server.services
            dead = LeaseStore(services.conn, services.writer, "r-dead")
            dead.announce("gone:1", 1000.0)  # alive until 1000 + ALIVE_FOR: long past
            dead.take("d-9", 1000.0)
            services.writer.flush()
            assert services.leases.holders(["d-9"], 1000.0 + ALIVE_FOR - 1) == {"d-9": "gone:1"}
            assert services.leases.holders(["d-9"], 1000.0 + ALIVE_FOR + 1) == {}
            # forgotten an hour after, and its lease with it
            assert services.leases.forget_dead(1000.0 + ALIVE_FOR + 3601) == 1
            assert _lease(server, "d-9") is None


@pytest.fixture
def pg_config(config: ServerConfig, pg_url: str) -> ServerConfig:
    return attrs.evolve(config, database=pg_url)


async def test_a_device_that_moves_to_b_while_a_lives_is_closed_on_a(
    pg_config: ServerConfig, operator_key: Ed25519PrivateKey
) -> None:
    key = Ed25519PrivateKey.generate()
    config_b = attrs.evolve(pg_config, data_dir=pg_config.data_dir.with_name("data-b"))
    with trio.fail_after(60):
        async with running_releaser(pg_config) as a, running_releaser(config_b) as b:
            id_a, id_b = a.services.leases.releaser_id, b.services.leases.releaser_id
            assert id_a != id_b
            addr_b = f"127.0.0.1:{b.port}"
            async with connect(a.port, key, peer_id="d-1") as on_a:
                await wait_for(lambda: _lease(a, "d-1") == id_a)
                # The device now reaches B (a new route; its link to A half-open).
                async with connect(b.port, key, peer_id="d-1") as on_b:
                    with trio.fail_after(10):  # poll interval + a flush, with slack
                        await on_a.peer.closed.wait()
                    assert on_a.peer.close_code == CloseCode.POLICY
                    assert f"connected to releaser {addr_b}" in (on_a.peer.close_reason or "")
                    assert not on_b.peer.closed.is_set()
                    await wait_for(lambda: "d-1" not in a.services.fleet)
                    assert _lease(a, "d-1") == id_b  # A's cleanup did not free B's lease
                    # Both releasers say the same, from the rows.
                    assert await _listed(a, operator_key) == {"d-1": (True, addr_b)}
                    assert await _listed(b, operator_key) == {"d-1": (True, addr_b)}
                    # A reaches its app through B, which holds the lease (forwarded:
                    # server/cluster_calls.py); this test device answers with an Ack,
                    # so the outcome is B's complaint, but the request came over B's link.
                    async with operator_connect(("127.0.0.1", a.port), operator_key) as op:
                        [outcome] = await op.app_control("restart", ["d-1"])
                    assert not outcome.ok
                    assert outcome.error == "__app_control__ result must be AppStatus, got Ack"
                    assert [m for m, _ in on_b.commands] == ["__app_control__"]
                    assert not any(m == "__app_control__" for m, _ in on_a.commands)
            await wait_for(lambda: _lease(a, "d-1") is None)
            # B stops cleanly: it frees its leases and says it is gone.
            async with connect(b.port, key, peer_id="d-2"):
                await wait_for(lambda: _lease(a, "d-2") == id_b)
                await b.shutdown()
            assert _lease(a, "d-2") is None
            row = a.services.conn.execute(
                "SELECT alive_until FROM releasers WHERE releaser_id = ?", (id_b,)
            ).fetchone()
            assert row is not None and row[0] == 0


async def test_a_push_queued_on_a_follows_the_device_to_b_and_ends_there(
    pg_config: ServerConfig,
    pg_url: str,
    operator_key: Ed25519PrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pending commands are rows (push_targets), not a releaser's memory: a push
    made on A while the device was away is sent by B when the device connects
    there, and once the device reports it finished, A offers it no more."""
    monkeypatch.setenv("FLEETPUSH_DATABASE", pg_url)  # the release rows go there
    publish(pg_config.data_dir, tmp_path, "1.1", restart=False)
    store = ReleaseStore.open(pg_config.data_dir)
    try:
        store.set_status("demo", "1.1", "pre-released", "t")
        store.set_status("demo", "1.1", "approved", "t")
    finally:
        store.close()
    key = Ed25519PrivateKey.generate()
    config_b = attrs.evolve(pg_config, data_dir=pg_config.data_dir.with_name("data-b"))
    with trio.fail_after(60):
        async with running_releaser(pg_config) as a, running_releaser(config_b) as b:
            async with connect(a.port, key, peer_id="away-1"):
                pass  # known to the fleet, then gone
            # A's side of the link ends on its own time (its delivery task may
            # be in a database call, server/db_calls.py): push once it has.
            await wait_for(lambda: "away-1" not in a.services.fleet)
            async with operator_connect(("127.0.0.1", a.port), operator_key) as op:
                result = await op.push(app="demo", version="1.1", devices=["away-1"])
            assert result.queued == ["away-1"]
            async with connect(b.port, key, peer_id="away-1") as dev:
                await wait_for(lambda: dev.commands)
                method, cmd = dev.commands[0]
                assert (method, cmd.version, cmd.push_id) == ("__force_update__", "1.1",
                                                             result.push_id)  # fmt: skip
                await dev.peer.notify(
                    "update_progress",
                    UpdateProgress(state="staged", app="demo", version="1.1", push_id=cmd.push_id),
                )
                pushes = b.services.pushes
                await wait_for(lambda: pushes.deliveries(cmd.push_id)["away-1"][2] == "staged")
            # Finished (staged: published with restart=False): back on A, nothing more.
            async with connect(a.port, key, peer_id="away-1") as dev:
                await wait_for(lambda: _lease(a, "away-1") == a.services.leases.releaser_id)
                await trio.sleep(0.3)
                assert dev.commands == []
            assert len(a.services.pushes.deliveries(result.push_id)) == 1


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_late_take_of_an_older_link_does_not_undo_a_newer_one(
    config: ServerConfig, backend: str, request: pytest.FixtureRequest
) -> None:
    """Each releaser queues its writes: A's take of a link that already ended,
    written after B's take of the newer one, must leave B's lease (and A's
    drop after it then deletes nothing)."""
    if backend == "postgres":
        config = attrs.evolve(config, database=request.getfixturevalue("pg_url"))
    with trio.fail_after(30):
        async with running_releaser(config) as server:
            services = server.services
            a = LeaseStore(services.conn, services.writer, "r-a")
            b = LeaseStore(services.conn, services.writer, "r-b")
            b.take("d-5", 2000.0)
            a.take("d-5", 1999.0)  # the older link's take, written late
            a.drop("d-5")
            services.writer.flush()
            assert _lease(server, "d-5") == "r-b"
            a.take("d-5", 2001.0)  # a newer connection to A does win
            assert _lease(server, "d-5") == "r-a"
