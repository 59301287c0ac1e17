"""push_fanout: who gets a push written at once, who through their link's queue, who waits.

fan_out is a decision over callables (like chunks.send_chunks): the links
here are records of what was asked of them. The real send path is covered
in tests/net/test_peer_request_nowait.py and the releaser's push tests.
"""

from __future__ import annotations

import attrs
from fleetpush.protocol import codec
from fleetpush.protocol.messages import UpdateCommand
from fleetpush.server.push_fanout import Fanout, fan_out, shared_command


@attrs.define
class Link:
    idle: bool = True  # its send side is free: send_now writes
    room: bool = True  # its outbox has room: offer takes it
    calls: list[str] = attrs.field(factory=list)


def _run(targets: list[str], online: dict[str, Link]) -> tuple[Fanout, list[str]]:
    order: list[str] = []

    def send_now(device_id: str, link: Link) -> bool:
        link.calls.append("send_now")
        if link.idle:
            order.append(device_id)
        return link.idle

    def offer(device_id: str, link: Link) -> bool:
        link.calls.append("offer")
        if link.room:
            order.append(device_id)
        return link.room

    return fan_out(targets, online, send_now, offer), order


SCENARIOS = {
    "idle link: written at once, never queued behind its outbox": (
        Link(),
        ["send_now"],
        "direct",
    ),
    "busy link (chunks, a pong): its own ordered path takes it": (
        Link(idle=False),
        ["send_now", "offer"],
        "sent",
    ),
    "busy link without room: queued in the database for its next connection": (
        Link(idle=False, room=False),
        ["send_now", "offer"],
        "queued",
    ),
}


def test_each_kind_of_link() -> None:
    for prose, (link, calls, outcome) in SCENARIOS.items():
        fan, _ = _run(["d"], {"d": link})
        assert link.calls == calls, prose
        got = "queued" if fan.queued else ("direct" if fan.direct else "sent")
        assert got == outcome, prose


def test_offline_targets_queue_and_order_is_the_targets() -> None:
    online = {"a": Link(), "c": Link(idle=False), "e": Link(idle=False, room=False)}
    fan, order = _run(["a", "b", "c", "d", "e"], online)
    assert fan.sent == ["a", "c"]
    assert fan.queued == ["b", "d", "e"]
    assert fan.direct == 1
    assert order == ["a", "c"]
    assert online["a"].calls == ["send_now"]


def test_shared_command_is_the_plain_command_encoded_once() -> None:
    force = shared_command("p1", "app", "2.0.0", "force", True)
    assert force.method == "__force_update__" and force.restart
    assert force.params.body == codec.packb(codec.to_wire(force.plain))
    assert force.plain == UpdateCommand(app="app", version="2.0.0", restart=True, push_id="p1")
    stage = shared_command("p2", "app", "2.0.0", "stage", True)
    assert stage.method == "__force_update__" and not stage.restart  # download now, apply later
    assert shared_command("p3", "app", "2.0.0", "apply", True).method == "__apply_update__"
