"""Two releasers on one PostgreSQL and one data dir, for the cluster tests (issue 15, part 2).

Both serve the same releases: the data dir holds their files (or an object
store would), the database their rows, and ``database.url`` in the data dir
sends ``release publish`` to the same database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio
from fleetpush.server import ServerHandle
from fp_releaser import releaser

T = TypeVar("T")


@asynccontextmanager
async def two_releasers(
    data_dir: Path, pg_url: str, *, data_b: Path | None = None, **kw: Any
) -> AsyncIterator[tuple[ServerHandle, ServerHandle]]:
    """Releasers A and B in this trio run, A started first (so A leads at once).

    B uses ``data_b`` if given (releases in an object store), else A's data dir.
    """
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(releaser(data_dir, database=pg_url, **kw))
        cluster_a = a.services.cluster
        assert cluster_a is not None
        with trio.fail_after(10):
            while not cluster_a.leader:
                await trio.sleep(0.05)
        b = await stack.enter_async_context(releaser(data_b or data_dir, database=pg_url, **kw))
        yield a, b


async def until(pred: Callable[[], T | None], timeout: float = 30.0, step: float = 0.1) -> T:
    """The first true value of ``pred()`` (polled); TooSlowError after ``timeout`` s."""
    with trio.fail_after(timeout):
        while True:
            value = pred()
            if value:
                return value
            await trio.sleep(step)
