"""server/gc_policy.py: sessions are frozen in batches and closed ones still get freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from fleetpush.server.gc_policy import MIN_BATCH, YOUNG_THRESHOLD, GcPolicy


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restore_gc")
def test_hooks_do_nothing_until_installed() -> None:
    policy = GcPolicy()
    frozen = gc.get_freeze_count()
    for _ in range(MIN_BATCH * 2):
        policy.connection_opened()
    assert gc.get_freeze_count() == frozen


@pytest.mark.usefixtures("restore_gc")
def test_closed_sessions_cycles_are_collected_after_a_freeze() -> None:
    policy = GcPolicy()
    policy.install()
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    node = _Node()
    ref = weakref.ref(node)
    for _ in range(MIN_BATCH):  # a batch of sessions opened: their objects get frozen
        policy.connection_opened()
    assert gc.get_freeze_count() > 0
    del node
    gc.collect()
    assert ref() is not None, "a frozen cycle was collected (it should wait for the unfreeze)"
    for _ in range(MIN_BATCH):  # a quarter (at least a batch) closed: unfreeze, collect
        policy.connection_closed()
    assert ref() is None, "the closed session's cycle was never freed"


@pytest.mark.usefixtures("restore_gc")
def test_freed_memory_is_returned_after_closes_at_most_every_interval() -> None:
    from fleetpush.server.gc_policy import TRIM_INTERVAL

    policy = GcPolicy()
    policy.connection_closed()
    assert not policy.trim_due(100.0)  # not installed: the library never touches the process
    policy.install()
    assert not policy.trim_due(100.0)  # nothing closed since install
    policy.connection_closed()
    assert policy.trim_due(100.0)
    calls: list[int] = []
    policy._trim = lambda pad: calls.append(pad) or 1
    policy.trim(100.0)
    assert calls == [0]
    policy.connection_closed()
    assert not policy.trim_due(100.0 + TRIM_INTERVAL / 2)  # too soon
    assert policy.trim_due(100.0 + TRIM_INTERVAL)
