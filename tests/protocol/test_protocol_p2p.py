"""Peer-to-peer delivery, sans-IO (specs/PROTOCOL.md §7.11): the peer token,
the tracker's choice of peers and the device's fetch policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
from fleetpush.protocol import codec, keys
from fleetpush.protocol import messages as m
from fleetpush.protocol.errors import BadSignature, TrustError, UnknownKey
from fleetpush.protocol.p2p import (
    GetPeers,
    PeerAddr,
    PeerList,
    PeerToken,
    PeerTokenError,
    ReportPeer,
    sign_peer_token,
    verify_peer_token,
)
from fleetpush.protocol.p2p_policy import (
    RELEASER,
    Candidate,
    FetchPolicy,
    chunk_deadline,
    nearness,
    select_peers,
)
from fleetpush.protocol.trust import TrustRoot
from fp_keys import fixed_key

TS, THIEF, ASKER = fixed_key(0xB1), fixed_key(0xB2), fixed_key(0xB3)
TRUST = TrustRoot.from_public_keys([keys.public_bytes(TS)])
NOW = 1_767_225_600
ASKER_KEY = keys.public_bytes(ASKER)


def token(**changes: Any) -> PeerToken:
    base = PeerToken(
        server_id="fp-1",
        issued=NOW - 5,
        expires=NOW + 600,
        asker="dev-a",
        asker_key=ASKER_KEY,
        app="demo",
        version="2.0",
        peers=["dev-b", "dev-c"],
    )
    return attrs.evolve(base, **changes)


#: prose -> (the token as received, verify kwargs changes, expected error or None).
SCENARIOS: dict[
    str, tuple[Callable[[], m.SignedManifest], dict[str, Any], type[Exception] | None]
] = {
    "a token naming this device, the asker and the release verifies": (
        lambda: sign_peer_token(token(), [TS]),
        {},
        None,
    ),
    "a token signed by a key outside the timestamp role is refused": (
        lambda: sign_peer_token(token(), [THIEF]),
        {},
        UnknownKey,
    ),
    "a token whose bytes were altered after signing is refused": (
        lambda: attrs.evolve(
            sign_peer_token(token(), [TS]),
            signed=token(peers=["dev-b", "dev-c", "dev-z"]).to_bytes(),
        ),
        {},
        BadSignature,
    ),
    "a token that does not name this serving device is refused": (
        lambda: sign_peer_token(token(), [TS]),
        {"me": "dev-z"},
        PeerTokenError,
    ),
    "a token issued to another device is refused": (
        lambda: sign_peer_token(token(), [TS]),
        {"asker": "dev-x"},
        PeerTokenError,
    ),
    "a token presented with another device key is refused": (
        lambda: sign_peer_token(token(), [TS]),
        {"asker_key": keys.public_bytes(THIEF)},
        PeerTokenError,
    ),
    "a token for another release is refused": (
        lambda: sign_peer_token(token(), [TS]),
        {"version": "1.9"},
        PeerTokenError,
    ),
    "an expired token is refused": (
        lambda: sign_peer_token(token(), [TS]),
        {"now": NOW + 600},
        PeerTokenError,
    ),
    "a token from the future is refused": (
        lambda: sign_peer_token(token(issued=NOW + 10, expires=NOW + 20), [TS]),
        {},
        PeerTokenError,
    ),
    "a token naming the asker as its own peer is malformed": (
        lambda: m.SignedManifest(
            signed=codec.packb(codec.to_wire(token(peers=["dev-a", "dev-b"]))),
            signatures=[
                m.Signature(
                    keyid=keys.keyid(TS),
                    sig=keys.sign(
                        TS,
                        b"fleetpush-peer-token-v1\x00",
                        codec.packb(codec.to_wire(token(peers=["dev-a", "dev-b"]))),
                    ),
                )
            ],
        ),
        {},
        PeerTokenError,
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_peer_token_scenarios(name: str) -> None:
    make, changes, expected = SCENARIOS[name]
    kwargs: dict[str, Any] = {
        "me": "dev-b",
        "asker": "dev-a",
        "asker_key": ASKER_KEY,
        "app": "demo",
        "version": "2.0",
        "now": NOW,
    } | changes
    if expected is None:
        t = verify_peer_token(TRUST, make(), **kwargs)
        assert t.peers == ["dev-b", "dev-c"]
    else:
        with pytest.raises(expected):
            verify_peer_token(TRUST, make(), **kwargs)


def test_peer_token_errors_are_trust_errors() -> None:
    assert issubclass(PeerTokenError, TrustError)
    with pytest.raises(PeerTokenError):
        PeerToken.from_bytes(b"\xc1not msgpack")
    with pytest.raises(PeerTokenError):
        token(expires=NOW + 10 * 3600).to_bytes()


def test_tracker_messages_are_in_the_catalogue_and_round_trip() -> None:
    assert m.METHODS["get_peers"].params is GetPeers
    assert m.METHODS["get_peers"].result is PeerList
    assert m.METHODS["report_peer"].params is ReportPeer
    answer = PeerList(
        peers=[PeerAddr(device_id="dev-b", host="10.0.0.2", port=7879)],
        token=sign_peer_token(token(), [TS]),
    )
    wire = codec.unpackb(codec.packb(codec.to_wire(answer)))
    assert codec.from_wire(PeerList, wire, "peer list") == answer
    with pytest.raises(ValueError):
        PeerAddr(device_id="dev-b", host="10.0.0.2", port=0)


# --- the tracker --------------------------------------------------------------


def cand(dev: str, **kw: Any) -> Candidate:
    base: dict[str, Any] = {
        "public_addr": "203.0.113.7",
        "subnet": "192.168.4.0/24",
        "host": "192.168.4.9",
        "port": 7879,
    }
    return Candidate(device_id=dev, **(base | kw))


def test_nearness_is_same_lan_then_same_site() -> None:
    me = cand("a", site="plant-1")
    assert nearness(me, cand("b")) == 2
    assert nearness(me, cand("c", public_addr="198.51.100.1", site="plant-1")) == 1
    assert nearness(me, cand("d", subnet="10.0.0.0/8")) == 0
    assert nearness(cand("e", subnet=None), cand("f", subnet=None)) == 0


def test_select_peers_prefers_lan_and_skips_bad_offline_and_non_serving() -> None:
    me = cand("me", site="s")
    holders = [
        cand("site-only", public_addr="198.51.100.1", site="s"),
        cand("bad"),
        cand("offline", online=False),
        cand("no-port", port=0),
        cand("far", public_addr="198.51.100.9", subnet="10.1.0.0/16"),
        cand("me"),
        *[cand(f"lan-{i}") for i in range(6)],
    ]
    got = [c.device_id for c in select_peers(me, holders, bad=frozenset({"bad"}), n=4)]
    assert len(got) == 4 and all(d.startswith("lan-") for d in got)
    # Same-LAN holders exist: only they are handed out, even with room for
    # more. A same-group peer behind another NAT announces a LAN address the
    # asker cannot reach (tests/netns/test_p2p_sites.py showed it handed out).
    every = [c.device_id for c in select_peers(me, holders, bad=frozenset({"bad"}), n=10)]
    assert len(every) == 6 and all(d.startswith("lan-") for d in every)
    # With no same-LAN holder, same-group peers are handed out.
    lanless = [h for h in holders if not h.device_id.startswith("lan-")]
    every = [c.device_id for c in select_peers(me, lanless, bad=frozenset({"bad"}), n=10)]
    assert every[-1] == "site-only" and len(every) == 1
    # Different askers get different orders, so load spreads over holders.
    orders = {
        tuple(c.device_id for c in select_peers(cand(f"asker-{i}"), holders, n=6)) for i in range(8)
    }
    assert len(orders) > 1


# --- the fetch policy ---------------------------------------------------------

MIB = 1 << 20


def test_deadline_is_about_four_seconds_per_mib() -> None:
    assert chunk_deadline(4 * MIB) == 16.0
    assert chunk_deadline(1024) == 2.0


def test_chunks_spread_over_peers_and_fall_back_to_the_releaser_without_peers() -> None:
    policy = FetchPolicy(chunks={i: MIB for i in range(9)}, peers=["p1", "p2", "p3"])
    plan = policy.assign(0.0)
    assert sorted(plan) == ["p1", "p2", "p3"] and all(len(v) == 3 for v in plan.values())
    alone = FetchPolicy(chunks={i: MIB for i in range(3)}, peers=[])
    assert alone.assign(0.0) == {RELEASER: [0, 1, 2]}


def test_a_corrupt_peer_is_dropped_and_its_chunks_go_elsewhere() -> None:
    policy = FetchPolicy(chunks={i: MIB for i in range(4)}, peers=["liar", "good"])
    plan = policy.assign(0.0)
    bad_key = plan["liar"][0]
    dropped = policy.corrupt(bad_key, "liar")
    assert (dropped.peer, dropped.reason) == ("liar", "corrupt")
    for key in plan["good"]:
        policy.received(key, "good")
    again = policy.assign(1.0)
    assert "liar" not in again
    assert bad_key in again[RELEASER]  # the chunk a peer lied about comes from the releaser
    for source, ks in again.items():
        for key in ks:
            policy.received(key, source)
    assert policy.finished and policy.live_peers == ["good"]
    assert policy.bytes_from_peers + policy.bytes_from_releaser == 4 * MIB


def test_a_silent_peer_misses_deadlines_is_replaced_and_the_releaser_fills_in() -> None:
    policy = FetchPolicy(chunks={i: MIB for i in range(4)}, peers=["mute", "good"])
    plan = policy.assign(0.0)
    for key in plan["good"]:
        policy.received(key, "good")
    assert policy.next_deadline() == chunk_deadline(MIB)
    assert policy.expire(1.0) == []
    dropped = policy.expire(chunk_deadline(MIB))
    assert [(d.peer, d.reason) for d in dropped] == [("mute", "slow")]
    rest = policy.assign(5.0)
    assert sorted(rest[RELEASER]) == sorted(plan["mute"])
    for key in rest[RELEASER]:
        policy.received(key, RELEASER)
    # A late answer from the replaced peer counts once, not twice.
    policy.received(plan["mute"][0], "mute")
    assert policy.finished and policy.bytes_from_releaser + policy.bytes_from_peers == 4 * MIB


def test_peers_that_vanish_mid_download_leave_the_releaser_to_finish() -> None:
    policy = FetchPolicy(chunks={i: MIB for i in range(6)}, peers=["p1", "p2"])
    plan = policy.assign(0.0)
    policy.received(plan["p1"][0], "p1")
    policy.gone("p1")
    policy.gone("p2")
    rest = policy.assign(1.0)
    assert list(rest) == [RELEASER] and len(rest[RELEASER]) == 5
    for key in rest[RELEASER]:
        policy.received(key, RELEASER)
    assert policy.finished
    assert (policy.bytes_from_peers, policy.bytes_from_releaser) == (MIB, 5 * MIB)


def test_busy_peers_hold_chunks_back_rather_than_load_the_releaser() -> None:
    policy = FetchPolicy(chunks={i: 1024 for i in range(20)}, peers=["p1"])
    plan = policy.assign(0.0, per_peer=8)
    assert list(plan) == ["p1"] and len(plan["p1"]) == 8
    assert policy.assign(0.1, per_peer=8) == {}


# --- the vector (specs/vectors/p2p_token.json) ------------------------------------


def test_peer_token_vector_is_current_and_verifies() -> None:
    import importlib.util

    from protocol_helpers import VECTORS, load_vectors

    spec = importlib.util.spec_from_file_location("fp_gen_p2p", VECTORS / "generate_p2p.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (VECTORS / "p2p_token.json").read_text(encoding="utf-8") == gen.render()
    v = load_vectors("p2p_token.json")
    signed = m.SignedManifest(
        signed=bytes.fromhex(v["canonical_hex"]),
        signatures=[
            m.Signature(keyid=s["keyid"], sig=bytes.fromhex(s["sig_hex"])) for s in v["signatures"]
        ],
    )
    trust = TrustRoot.from_public_keys([bytes.fromhex(v["timestamp_public_hex"])])
    f = v["fields"]
    t = verify_peer_token(
        trust,
        signed,
        me="dev-c",
        asker=f["asker"],
        asker_key=bytes.fromhex(v["asker_public_hex"]),
        app=f["app"],
        version=f["version"],
        now=f["issued"],
    )
    assert (t.issued, t.expires, t.peers) == (f["issued"], f["expires"], f["peers"])
    assert codec.unpackb(signed.signed)["server_id"] == f["server_id"]
