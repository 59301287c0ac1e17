"""The live device links of one releaser, by device id.

A handler that must reach a connected device (an operator's push, an
enrollment decision) looks it up here and drives it through
:class:`DeviceLink`, never through the session that implements it; so the
handler modules need not import ``session.py`` and the session need not know
who calls it.

One device id has at most one link: a newer authenticated connection replaces
the older one, closed with 1014 (specs/PROTOCOL.md §9.2), and only the link that is current may
remove itself, so the replaced connection's end does not unregister the new one.
"""

from __future__ import annotations

from typing import Protocol

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

    def wake(self) -> None:
        """Look for queued pushes in the database (after an acceptance, a full outbox...)."""
        ...

    def set_enrollment(self, decision: str) -> None:
        """An operator accepted (deliver its pushes) or rejected (close) the device."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Say ``bye`` with ``code`` and close the connection."""
        ...


class Fleet:
    """Live links by device id (trio thread only)."""

    def __init__(self) -> None:
        self._links: dict[str, DeviceLink] = {}

    def get(self, device_id: str) -> DeviceLink | None:
        return self._links.get(device_id)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._links

    def __len__(self) -> int:
        return len(self._links)

    def attach(self, device_id: str, link: DeviceLink) -> DeviceLink | None:
        """Make ``link`` the device's live link; returns the one it replaces, if any."""
        old = self._links.get(device_id)
        self._links[device_id] = link
        return old

    def detach(self, device_id: str, link: DeviceLink) -> bool:
        """Forget ``link`` if it is still the device's current one; True if it was."""
        if self._links.get(device_id) is not link:
            return False
        del self._links[device_id]
        return True
