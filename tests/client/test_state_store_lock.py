"""The state store's writes and the install engine's never lose each other's.

The install engine writes state.json from a worker thread (or another
process) under ``<state>/lock``; the trio side changes it through
``StateStore.change`` (history records, acknowledged entries removed...).
A change that read the state before an apply committed and saved it after
put the old ``installed_version`` back: seen in `fleetpush bench --delta
identical` (an identical release applies in milliseconds while the history
flusher removes what the releaser acknowledged), the device then said 1.0.0
with 2.0.0 installed. Reproduced here deterministically: the engine holds
the lock across its write, as apply_staged does.
"""

from __future__ import annotations

import threading
from pathlib import Path

import attrs
import trio
from fleetpush.client.context import StateStore
from fleetpush.client.journal import install_lock
from fleetpush.client.state import DeviceState, load_state, save_state


async def test_a_change_waits_for_the_engine_and_keeps_its_write(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    save_state(state_dir, attrs.evolve(DeviceState(), app="demo", installed_version="1.0"))
    store = StateStore(state_dir, load_state(state_dir))
    holding, release = threading.Event(), threading.Event()

    def engine() -> None:  # apply_staged's shape: lock, (work), save, unlock
        with install_lock(state_dir):
            holding.set()
            release.wait(10)
            s = load_state(state_dir)
            save_state(state_dir, attrs.evolve(s, installed_version="2.0"))

    worker = threading.Thread(target=engine)
    worker.start()
    try:
        await trio.to_thread.run_sync(holding.wait, 10)
        done = trio.Event()

        async def record() -> None:
            await store.change(lambda s: s.record(1.0, "staged", "2.0"))
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(record)
            with trio.move_on_after(0.5):
                await done.wait()
            assert not done.is_set(), "the change wrote while the engine held the lock"
            release.set()
            with trio.fail_after(10):
                await done.wait()
    finally:
        release.set()
        worker.join(10)
    after = load_state(state_dir)
    assert after.installed_version == "2.0"  # the engine's write survived
    assert [h["state"] for h in after.history] == ["staged"]  # and so did the change
