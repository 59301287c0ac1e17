"""Which accepted push the releaser offers again (specs/PROTOCOL.md §7.4, issue 10 item 10).

The decision (``PushStore.next_pending``) reads only the push's ``result``:
a finished push is never offered again, whatever the device reports later
and in whatever order the write-behind applies its progress rows; an accepted
push that is not finished is offered again, once per connection.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from fleetpush.protocol.messages import Hello, Outcome, UpdateProgress
from fleetpush.server import db
from fleetpush.server.registry import DeviceRegistry, PushStore

_report_ids = itertools.count()


class Releaser:
    """The registry and push store of one releaser, sharing one write-behind."""

    def __init__(self, tmp_path: Path) -> None:
        conn = db.open_database(tmp_path)
        self.writer = db.WriteBehind(conn, max_pending=10_000)
        self.devices = DeviceRegistry(conn, self.writer)
        self.pushes = PushStore(conn, self.writer)
        self.devices.register(_hello("1.0.0"), "accepted", 1.0)

    def push(self, push_id: str, version: str = "2.0.0", mode: str = "force") -> int:
        """A push to dev-1, sent and acknowledged (``accepted``, written behind)."""
        ids = self.pushes.create(
            push_id=push_id,
            operator="ops",
            app="demo",
            version=version,
            mode=mode,
            restart=mode != "stage",
            selector={"devices": ["dev-1"]},
            targets=["dev-1"],
            sent={"dev-1"},
            now=2.0,
        )
        self.pushes.mark(ids["dev-1"], "accepted", "", 3.0)
        return ids["dev-1"]

    def progress(self, state: str, version: str = "2.0.0", push_id: str = "") -> None:
        """A live ``update_progress``, as server/device_api.py records it (written behind)."""
        p = UpdateProgress(state=state, app="demo", version=version, push_id=push_id)
        self.devices.record_progress("dev-1", p, 4.0)
        if push_id:
            self.pushes.record_result(push_id, "dev-1", state, 4.0)
        elif state == "committed":
            self.pushes.record_committed("dev-1", "demo", version, 4.0)

    def report(self, event: str, state: str, version: str = "2.0.0", push_id: str = "") -> None:
        """A ``report_outcomes`` entry, committed before it returns."""
        o = Outcome(
            report_id=f"r{next(_report_ids)}",
            event=event,
            time=5.0,
            state=state,
            app="demo",
            version=version,
            push_id=push_id,
        )
        assert self.devices.record_outcomes("dev-1", [o], 5.0) == [o]

    def offered(self, skip: set[int] | None = None) -> str | None:
        cmd = self.pushes.next_pending("dev-1", skip or set())
        return None if cmd is None else cmd.push_id

    def result(self, push_id: str) -> str | None:
        return self.pushes.deliveries(push_id)["dev-1"][2]


def _hello(version: str) -> Hello:
    return Hello(
        protocol_version="1.0",
        role="device",
        peer_id="dev-1",
        public_key=bytes(32),
        app="demo",
        version=version,
        channel="stable",
    )


def _repaired_back_to_1(r: Releaser) -> None:
    """What a device that restored 1.0.0 from its backup reports on its next connection."""
    r.devices.register(_hello("1.0.0"), "accepted", 6.0)
    r.report("repaired", "", version="1.0.0")


# How the force push p1 (2.0.0) finishes: the order of the device's messages
# and of the write-behind's flushes around the committing report varies.
FINISHING: dict[str, Callable[[Releaser], None]] = {
    "the trial's committed report names no push (the reference device)": lambda r: (
        r.progress("staged", push_id="p1"),
        r.progress("applying", push_id="p1"),
        r.report("staged", "staged", push_id="p1"),
        r.progress("trial"),
        r.report("applied", "trial"),
        r.report("committed", "committed"),
    ),
    "progress of the push flushed before the committed report": lambda r: (
        r.progress("staged", push_id="p1"),
        r.writer.flush(),
        r.report("committed", "committed"),
    ),
    "a late progress row of the push after the committed report": lambda r: (
        r.report("committed", "committed"),
        r.progress("checking", push_id="p1"),
        r.progress("downloading", push_id="p1"),
    ),
    "the committed report names the push, a late row follows": lambda r: (
        r.report("committed", "committed", push_id="p1"),
        r.progress("staged", push_id="p1"),
    ),
    "a live committed progress naming no push (an older device)": lambda r: (
        r.progress("staged", push_id="p1"),
        r.progress("committed"),
    ),
    "rolled back, reported with the push id": lambda r: (
        r.progress("applying", push_id="p1"),
        r.report("rolled-back", "rolled_back", version="1.0.0", push_id="p1"),
        r.progress("trial", push_id="p1"),
    ),
}


@pytest.mark.parametrize("finish", list(FINISHING), ids=list(FINISHING))
def test_a_finished_push_is_not_offered_again(tmp_path: Path, finish: str) -> None:
    r = Releaser(tmp_path)
    r.push("p1")
    assert r.offered() == "p1"  # accepted, nothing reported yet
    FINISHING[finish](r)
    assert r.result("p1") in ("committed", "rolled_back")
    assert r.offered() is None
    # The device repaired itself back to 1.0.0: the push stays finished, the
    # operator decides whether to push again.
    _repaired_back_to_1(r)
    assert r.offered() is None
    assert r.result("p1") in ("committed", "rolled_back")


# How the force push p1 (2.0.0) is left unfinished: the device must get it again.
UNFINISHED: dict[str, Callable[[Releaser], None]] = {
    "accepted, nothing reported (a device killed right after its ack)": lambda r: None,
    "staged by a push that also applies": lambda r: r.report("staged", "staged", push_id="p1"),
    "still downloading": lambda r: r.progress("downloading", push_id="p1"),
    "the device committed another version": lambda r: r.report(
        "committed", "committed", version="1.5.0"
    ),
    "repaired back to 1.0.0 in the middle of the push": _repaired_back_to_1,
}


@pytest.mark.parametrize("leave", list(UNFINISHED), ids=list(UNFINISHED))
def test_an_accepted_unfinished_push_is_offered_again(tmp_path: Path, leave: str) -> None:
    r = Releaser(tmp_path)
    target = r.push("p1")
    UNFINISHED[leave](r)
    assert r.offered() == "p1"
    assert r.offered() == "p1"  # on every connection...
    assert r.offered(skip={target}) is None  # ...once per connection (session.attempted)


def test_a_push_that_only_stages_is_finished_once_staged(tmp_path: Path) -> None:
    r = Releaser(tmp_path)
    r.push("s1", mode="stage")
    r.progress("downloading", push_id="s1")
    assert r.offered() == "s1"
    r.report("staged", "staged", push_id="s1")
    assert r.offered() is None


def test_only_the_newest_push_is_offered_again(tmp_path: Path) -> None:
    r = Releaser(tmp_path)
    r.push("p1")
    r.push("p2", version="2.1.0")
    assert r.offered() == "p2"
    # Its commit finishes p2 only (p1, of another version, stays as it was).
    r.report("committed", "committed", version="2.1.0")
    assert r.offered() is None
    assert (r.result("p1"), r.result("p2")) == (None, "committed")
