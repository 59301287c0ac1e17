"""The live device links of one releaser, by device id.

A handler that must reach a connected device (an operator's push, an
enrollment decision) looks it up here and drives it through
:class:`DeviceLink`, never through the session that implements it; so the
handler modules need not import ``session.py`` and the session need not know
who calls it.

One device id has at most one link: a newer authenticated connection replaces
the older one, closed with 1014 (specs/PROTOCOL.md §9.2), and only the link that is current may
remove itself, so the replaced connection's end does not unregister the new one.
Taking over is right for the common case, a device whose old link went
half-open after a network drop (MQTT brokers do the same). Two devices that
share one id take over from each other without end; more than
:data:`TAKEOVER_LIMIT` takeovers of one id within :data:`TAKEOVER_WINDOW`
seconds is that ping-pong: :meth:`Fleet.refuse_takeover` says so, the
session refuses the newcomer (``CONFLICT``, §5.5) and records a
``duplicate_device_id`` event with both addresses, and the device backs off.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Final, Protocol

import attrs

from .push_fanout import SharedCommand
from .registry import PendingCommand


class DeviceLink(Protocol):
    """What the releaser may do with one connected, authenticated device."""

    @property
    def can_take_commands(self) -> bool:
        """True while the device is accepted (pending devices get no pushes)."""
        ...

    @property
    def has_room(self) -> bool:
        """True if :meth:`offer_command` would take a command right now."""
        ...

    def offer_command(self, cmd: PendingCommand) -> bool:
        """Hand a push to the device's delivery task without waiting; False if it is full."""
        ...

    def send_command_now(self, target_id: int, command: SharedCommand) -> bool:
        """Write a push's command to the device at once if nothing else is being sent.

        False (nothing sent) if the link is busy or has commands waiting:
        then :meth:`offer_command` keeps them in order (push_fanout.py).
        """
        ...

    def wake(self) -> None:
        """Look for queued pushes in the database (after an acceptance, a full outbox...)."""
        ...

    def set_enrollment(self, decision: str) -> None:
        """An operator accepted (deliver its pushes) or rejected (close) the device."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Say ``bye`` with ``code`` and close the connection."""
        ...

    async def request(self, method: str, params: object, timeout: float) -> object:
        """Ask the device (``__app_control__``...); its answer.

        Raises RpcError (its refusal), PeerClosed, trio.TooSlowError.
        """
        ...

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run ``fn(*args)`` for as long as the connection lives (nothing once it ended)."""
        ...


#: Takeovers of one device id that a ping-pong between two devices exceeds...
TAKEOVER_LIMIT: Final = 3
#: ...within this many seconds.
TAKEOVER_WINDOW: Final = 60.0
#: Device ids whose recent takeovers are remembered (oldest forgotten first).
MAX_WATCHED: Final = 10_000


@attrs.frozen(kw_only=True)
class Duplicate:
    """Two devices use one id: the live link's address and the newcomer's."""

    device_id: str
    live: str
    newcomer: str
    takeovers: int
    since: float

    def sentence(self) -> str:
        """What ``devices`` shows (DeviceInfo.duplicate)."""
        return (
            f"two devices use this id: connected from {self.live}, "
            f"refused from {self.newcomer} after {self.takeovers} takeovers"
        )


class Fleet:
    """Live links by device id (trio thread only)."""

    def __init__(self) -> None:
        self._links: dict[str, DeviceLink] = {}
        #: the source address of each live link (for the duplicate report)
        self._addresses: dict[str, str] = {}
        #: when each device id recently took over a live link of its own
        self._takeovers: dict[str, deque[float]] = {}
        #: device ids found shared, with the last report (shown in ``devices``)
        self.duplicates: dict[str, Duplicate] = {}

    def get(self, device_id: str) -> DeviceLink | None:
        return self._links.get(device_id)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._links

    def __len__(self) -> int:
        return len(self._links)

    def device_ids(self) -> Collection[str]:
        """The ids of the live links (a live view: copy it before awaiting)."""
        return self._links.keys()

    def close_link(self, code: int, device_id: str, reason: str) -> None:
        """Start closing ``device_id``'s live link, if any, without waiting for it."""
        link = self._links.get(device_id)
        if link is not None:
            link.spawn(link.close, code, reason)

    def refuse_takeover(self, device_id: str, address: str, now: float) -> Duplicate | None:
        """A Duplicate if a new link for ``device_id`` from ``address`` must back off.

        Only when the id is live and already took over more than
        :data:`TAKEOVER_LIMIT` times in :data:`TAKEOVER_WINDOW` seconds (``now``
        is a monotonic clock); the refused newcomer does not count.
        """
        if device_id not in self._links:
            return None
        recent = self._takeovers.get(device_id)
        if recent is None:
            return None
        while recent and now - recent[0] > TAKEOVER_WINDOW:
            recent.popleft()
        if len(recent) < TAKEOVER_LIMIT:
            return None
        dup = Duplicate(
            device_id=device_id,
            live=self._addresses.get(device_id, "?"),
            newcomer=address,
            takeovers=len(recent),
            since=now,
        )
        self.duplicates[device_id] = dup
        return dup

    def address(self, device_id: str) -> str:
        """The address a live device connects from ("?" if unknown): peer nearness (§7.11)."""
        return self._addresses.get(device_id, "?")

    def attach(
        self, device_id: str, link: DeviceLink, address: str = "?", now: float = 0.0
    ) -> DeviceLink | None:
        """Make ``link`` the device's live link; returns the one it replaces, if any."""
        old = self._links.get(device_id)
        self._links[device_id] = link
        self._addresses[device_id] = address
        if old is not None:
            recent = self._takeovers.pop(device_id, None) or deque(maxlen=TAKEOVER_LIMIT + 1)
            recent.append(now)
            self._takeovers[device_id] = recent  # most recent last: oldest forgotten first
            if len(self._takeovers) > MAX_WATCHED:
                del self._takeovers[next(iter(self._takeovers))]
        return old

    def detach(self, device_id: str, link: DeviceLink) -> bool:
        """Forget ``link`` if it is still the device's current one; True if it was."""
        if self._links.get(device_id) is not link:
            return False
        del self._links[device_id]
        self._addresses.pop(device_id, None)
        return True
