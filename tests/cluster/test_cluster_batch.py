"""The pure half of the cluster bus (server/cluster_batch.py): no database, no clock."""

from __future__ import annotations

import pytest
from fleetpush.server.cluster_batch import (
    HEARTBEAT,
    MAX_PAYLOAD,
    SEQ_BLOCK_TTL,
    SILENT_AFTER,
    BusPayloadError,
    Note,
    Outbox,
    Presence,
    Seen,
    SeqBlocks,
    SeqUnavailable,
    decode,
    encode,
    split,
)
from hypothesis import given
from hypothesis import strategies as st


@given(
    st.lists(st.integers(min_value=1, max_value=2**62), max_size=3000),
    st.lists(st.text(alphabet="0123456789abcdef", min_size=16, max_size=16), max_size=600),
    st.lists(st.text(alphabet="0123456789abcdef", min_size=16, max_size=16), max_size=600),
)
def test_split_keeps_every_id_in_order_under_the_payload_limit(
    events: list[int], pushes: list[str], calls: list[str]
) -> None:
    payloads = split("r1", events, pushes, calls)
    assert all(len(p.encode()) <= MAX_PAYLOAD for p in payloads)
    notes = [decode(p) for p in payloads]
    assert [s for n in notes for s in n.events] == events
    assert [p for n in notes for p in n.pushes] == pushes
    assert [c for n in notes for c in n.calls] == calls
    assert all(n.origin == "r1" for n in notes)
    assert (payloads == []) == (not events and not pushes and not calls)


def test_a_note_without_calls_is_encoded_as_before_calls_existed() -> None:
    # A releaser of the previous version decodes it (and ignores "c" otherwise).
    assert encode(Note(origin="r", events=(1,))) == '{"r":"r","e":[1],"p":[]}'
    note = Note(origin="r", calls=("c1", "c2"))
    assert decode(encode(note)) == note


def test_encode_decode_round_trip_and_bad_payloads_raise_one_error() -> None:
    note = Note(origin="host-1-ab", events=(5, 7), pushes=("p1",))
    assert decode(encode(note)) == note
    for bad in ("", "[]", '{"e": [1]}', '{"r": 5}', '{"r": "x", "e": ["a"]}', "\xff"):
        with pytest.raises(BusPayloadError):
            decode(bad)


def test_the_outbox_sends_ids_once_and_a_heartbeat_when_idle() -> None:
    box = Outbox("r1")
    assert box.take(0.0) == [encode(Note(origin="r1"))]  # first: a heartbeat
    assert box.take(0.1) == []
    box.add_event(3)
    box.add_push("p")
    box.add_call("c")
    assert [decode(p) for p in box.take(0.2)] == [
        Note(origin="r1", events=(3,), pushes=("p",), calls=("c",))
    ]
    assert box.take(0.3) == []
    assert box.take(0.2 + HEARTBEAT) == [encode(Note(origin="r1"))]
    assert box.figures.notifies == 3 and box.figures.ids == 3 and box.figures.heartbeats == 2


def test_seen_remembers_a_bounded_window() -> None:
    seen = Seen(size=3)
    assert [seen.add(s) for s in (1, 2, 1, 3, 4)] == [True, True, False, True, True]
    assert 1 not in seen and 4 in seen


def test_seq_blocks_are_unique_across_releasers_and_grow_per_releaser() -> None:
    shared = iter(range(1, 10**6, 10))  # a database sequence with INCREMENT BY 10
    now = [0.0]
    a = SeqBlocks(lambda: next(shared), lambda: now[0], size=10)
    b = SeqBlocks(lambda: next(shared), lambda: now[0], size=10)
    got_a = [a() for _ in range(25)]
    got_b = [b() for _ in range(25)]
    assert got_a == sorted(got_a) and got_b == sorted(got_b)
    assert not set(got_a) & set(got_b)
    # An idle releaser gives up its old block instead of writing far behind.
    blocks = a.blocks
    now[0] += SEQ_BLOCK_TTL + 1
    assert a() > max(got_b) and a.blocks == blocks + 1


def test_presence_forgets_a_silent_releaser() -> None:
    p = Presence()
    p.heard("r2", 0.0)
    p.event("r2", "connected", "d1")
    assert p.where("d1", 1.0) == "r2"
    p.event("r3", "disconnected", "d1")  # another releaser's old link: not this one
    assert p.where("d1", 1.0) == "r2"
    assert p.where("d1", SILENT_AFTER + 1) is None
    p.event("r2", "disconnected", "d1")
    assert p.where("d1", 1.0) is None


def test_an_unreachable_database_spends_the_old_block_then_says_so() -> None:
    now = [0.0]
    blocks = iter([1])

    def take() -> int:
        try:
            return next(blocks)
        except StopIteration:
            raise SeqUnavailable("down") from None

    seqs = SeqBlocks(take, lambda: now[0], size=3)
    assert seqs() == 1
    now[0] += SEQ_BLOCK_TTL + 1  # too old, but no new block can be had
    assert [seqs(), seqs()] == [2, 3]
    with pytest.raises(SeqUnavailable):
        seqs()
