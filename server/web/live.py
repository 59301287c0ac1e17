"""Live updates for open pages: Server-Sent Events from the event hub and from a device's logs.

``/live`` subscribes a :class:`~fleetpush.server.events.Watcher` (bounded by
count and bytes, like ``fleetpush watch``: a browser that falls behind loses
events, counted, never the releaser's memory) and sends at most one message
per :data:`BATCH` seconds naming what changed; the page's script then
re-fetches its ``main`` (static/app.js). A device's log panel follows its
app's output through the ``app_logs`` handler itself, as ``logs --follow``
does. Each stream ends when the browser goes (``http.disconnect``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio
from fleetpush.protocol import FleetpushError, RpcError
from fleetpush.protocol.messages import Event

from ..events import EventHub, Watcher
from .http import SECURITY_HEADERS, Receive, Send

#: Gathering window: one message per this many seconds at most (well inside the 1 s target).
BATCH: Final = 0.1
#: A comment line this often keeps proxies and the browser from timing the stream out.
KEEPALIVE: Final = 15.0
#: Device ids named in one message at most (the page re-fetches anyway).
MAX_NAMED: Final = 50
#: Log batches queued for one browser before they are dropped (counted).
LOG_QUEUE: Final = 64
#: Live streams open at once, all browsers together.
MAX_STREAMS: Final = 200

Notify = Callable[[str, object], Awaitable[None]]


class StreamBudget:
    """Live streams open at once, all browsers together (one per dashboard)."""

    def __init__(self, limit: int = MAX_STREAMS) -> None:
        self.limit = limit
        self.open = 0


def sse(event: str | None, data: object) -> bytes:
    """One Server-Sent Event, its data one JSON line."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _start(budget: StreamBudget, send: Send) -> bool:
    """Send the stream's head (or a 503 when too many are open); False if refused."""
    if budget.open >= budget.limit:
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain"), *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": b"too many live streams"})
        return False
    headers = [(b"content-type", b"text/event-stream"), *SECURITY_HEADERS]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b": open\n\n", "more_body": True})
    return True


async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def events(hub: EventHub, budget: StreamBudget, receive: Receive, send: Send) -> None:
    """Relay what changes in the fleet to one browser until it goes."""
    # Subscribed before the browser hears the stream is open: nothing that
    # happens after that can be missed.
    watcher = hub.subscribe()
    try:
        if not await _start(budget, send):
            return
        budget.open += 1
        try:
            await _relay(watcher, receive, send)
        finally:
            budget.open -= 1
    finally:
        watcher.close()


async def _relay(watcher: Watcher, receive: Receive, send: Send) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
        while True:
            first: Event | None = None
            with trio.move_on_after(KEEPALIVE):
                try:
                    first = await watcher.__anext__()
                except StopAsyncIteration:  # the watcher was closed: the stream ends
                    nursery.cancel_scope.cancel()
                    return
            if first is None:
                await send({"type": "http.response.body", "body": b": keepalive\n\n",
                            "more_body": True})
                continue
            await trio.sleep(BATCH)
            batch = [first]
            while True:
                try:
                    batch.append(watcher.take_nowait())
                except trio.WouldBlock:
                    break
            dropped = watcher.take_dropped()
            if dropped is not None:
                batch.append(dropped)
            await send({"type": "http.response.body", "more_body": True,
                        "body": sse(None, _summary(batch))})


def _summary(batch: list[Event]) -> dict[str, Any]:
    devices = sorted({e.device_id for e in batch if e.device_id is not None})
    return {
        "seq": batch[-1].seq,
        "kinds": sorted({e.kind for e in batch}),
        "devices": devices[:MAX_NAMED],
        "count": len(batch),
    }


async def logs(
    follow: Callable[[trio.Nursery, Notify], Awaitable[Any]],
    budget: StreamBudget,
    receive: Receive,
    send: Send,
) -> None:
    """Stream one device's app output: its last lines, then new ones as they come."""
    if not await _start(budget, send):
        return
    budget.open += 1
    queue_send, queue_receive = trio.open_memory_channel[Event](LOG_QUEUE)
    lost = 0

    async def notify(method: str, params: object) -> None:
        nonlocal lost
        if not isinstance(params, Event):
            return
        try:
            queue_send.send_nowait(params)
        except trio.WouldBlock:
            lost += 1

    async def out(event: str | None, data: object) -> None:
        await send({"type": "http.response.body", "more_body": True, "body": sse(event, data)})

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
            try:
                tail = await follow(nursery, notify)
            except (FleetpushError, trio.TooSlowError) as e:
                await out("end", e.message if isinstance(e, RpcError) else str(e))
                nursery.cancel_scope.cancel()
                return
            await out(None, {"lines": tail.lines, "dropped": tail.dropped})
            async for event in queue_receive:
                if event.kind == "app_log_end":
                    await out("end", event.data.get("reason", "the stream ended"))
                    break
                dropped = int(event.data.get("dropped", 0)) + lost
                lost = 0
                await out(None, {"lines": event.data.get("lines", []), "dropped": dropped})
            nursery.cancel_scope.cancel()
    finally:
        budget.open -= 1
