"""Who follows which device's app logs (``fleetpush logs --follow``; app_remote.py).

Each follower has a bounded queue: an operator who reads slowly loses
batches, counted and reported in the next one, never the releaser's memory.
"""

from __future__ import annotations

from typing import Final

import trio
from fleetpush.protocol.messages import AppLogLines

#: app_log batches queued per follower before they are dropped (and counted).
FOLLOW_QUEUE: Final = 64


class LogRelay:
    """Who follows which device's logs, and the bounded queue of each (trio thread only)."""

    def __init__(self) -> None:
        self._followers: dict[str, set[Follower]] = {}

    def followed(self, device_id: str) -> bool:
        return bool(self._followers.get(device_id))

    def add(self, device_id: str) -> Follower:
        follower = Follower()
        self._followers.setdefault(device_id, set()).add(follower)
        return follower

    def remove(self, device_id: str, follower: Follower) -> bool:
        """Forget ``follower``; True if it was the device's last one."""
        followers = self._followers.get(device_id)
        if followers is None:
            return False
        followers.discard(follower)
        if followers:
            return False
        del self._followers[device_id]
        return True

    def deliver(self, device_id: str, batch: AppLogLines) -> None:
        """A device's ``app_log``: to each of its followers, or nowhere."""
        for follower in self._followers.get(device_id, ()):
            follower.offer(batch)

    def device_gone(self, device_id: str) -> None:
        """The device's connection ended: end every follower's stream."""
        for follower in self._followers.get(device_id, ()):
            follower.send.close()


class Follower:
    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[AppLogLines](FOLLOW_QUEUE)
        self.dropped = 0

    def offer(self, batch: AppLogLines) -> None:
        try:
            self.send.send_nowait(batch)
        except trio.WouldBlock:
            self.dropped += len(batch.lines) + batch.dropped
        except trio.ClosedResourceError:
            pass
