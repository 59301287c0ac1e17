"""One owner of a device: an exclusive lock on the state directory (issue 11).

Whoever acts on a device holds ``<state>/owner.lock`` (``flock``) for as long
as it acts: the running agent or embedded ``Updater.run`` for its lifetime, a
device command (``fleetpush update``, ``status``...) for one command when no
agent runs. A second owner is refused at once with the holder's pid, so two
agents never share a state dir (and never flap one device id on the
releaser), and a command never changes files under a running app: it talks
to the owner through the control socket instead (control.py, local.py).

This lock is distinct from the short install lock (journal.install_lock),
which the owner itself takes around each apply or rollback. The kernel drops
an ``flock`` when its holder dies, so a kill -9 never leaves a stale owner;
the descriptor is close-on-exec, so neither the supervised app nor the
apply-mode re-exec inherits it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from types import TracebackType

from .errors import StateError, UpdaterError
from .layout import StateLayout


class OwnerBusy(UpdaterError):
    """Another process owns the state directory; ``pid`` names it (None if unknown)."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def holder_pid(layout: StateLayout) -> int | None:
    """The pid the current (or last) owner wrote in the lock file, if readable."""
    try:
        text = layout.owner_lock.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    first = text.split(maxsplit=1)[0] if text.split() else ""
    return int(first) if first.isdigit() else None


class OwnerLock:
    """The held owner lock of one state directory; release it (or use ``with``)."""

    def __init__(self, layout: StateLayout, fd: int, role: str) -> None:
        self.layout = layout
        self.role = role
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, layout: StateLayout, role: str) -> OwnerLock:
        """Take the lock without waiting and write ``<pid> <role>`` into it.

        Raises :class:`OwnerBusy` (held by another process, or by another
        OwnerLock of this one) or :class:`StateError` (cannot open the file).
        """
        try:
            layout.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(layout.owner_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"cannot open {layout.owner_lock}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = holder_pid(layout)
            who = f"pid {pid}" if pid is not None else "an unknown pid"
            raise OwnerBusy(
                f"{layout.root} is owned by another fleetpush process ({who}); "
                "only one agent or device command may act on it at a time",
                pid,
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {role}\n".encode(), 0)
        except OSError:
            pass  # the pid is a courtesy for the loser's message, not the lock itself
        return cls(layout, fd, role)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays: removing it would race a new owner."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> OwnerLock:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


__all__ = ["OwnerBusy", "OwnerLock", "holder_pid"]
