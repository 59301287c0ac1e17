"""What the updater's steps share, passed in: :class:`UpdateContext`.

The steps of an update (update_check.py, update_stage.py, forced_push.py,
command_runner.py, startup.py, trial_watch.py, reporting.py) and the hosts
(hosts.py, agent.py) receive this context, or plain callables, never the
:class:`~fleetpush.client.updater.Updater` that composes them (STYLE.md §8):
a step can be read, and tested, knowing only what it is given.
``tests/architecture/test_architecture_layers.py`` guards that no step module
imports updater.py.

* :class:`StateStore`: the device state, loaded and changed in one place;
* :class:`Reporter`: live ``update_progress`` and the persisted history
  (implemented by reporting.py);
* :class:`Link`: requests and notifications on the releaser session
  (implemented by session.py);
* :class:`Spawner`: background tasks in the updater's nursery, while it runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import attrs
import trio
from fleetpush.protocol.messages import HelloResult

from fleetpush.net.peer import Peer

from .config import UpdaterConfig
from .journal import install_lock
from .layout import StateLayout
from .roots import TrustedRoots
from .state import DeviceState, load_state, save_state

if TYPE_CHECKING:
    from .p2p_agent import DeviceP2P


class StateStore:
    """The device state (state.json) of one updater: the cached copy, reloads, changes.

    Every change the updater makes goes through :meth:`change`, one at a time
    (a read-modify-write in a worker thread, saved atomically by state.py).
    The install engine (install.py, trial.py) writes the state itself under its
    file lock; :meth:`reload` and :meth:`adopt` pick its result up.

    ``op_lock`` is held by one update operation at a time (check and stage);
    ``op_lock.locked()`` says one is under way.
    """

    def __init__(self, state_dir: Path, state: DeviceState) -> None:
        self.state_dir = state_dir
        #: the last state loaded or written by this process.
        self.state = state
        self.op_lock = trio.Lock()
        self._writing = trio.Lock()

    @classmethod
    def open(cls, config: UpdaterConfig) -> StateStore:
        """Load the state, filling in the configured app and first version once.

        Raises :class:`~fleetpush.client.errors.StateError` (a corrupt state
        file) or a FilesystemError from saving.
        """
        with install_lock(config.state_dir):  # see change()
            state = load_state(config.state_dir)
            changed = False
            if not state.app:
                state, changed = attrs.evolve(state, app=config.app), True
            if state.installed_version is None and config.version is not None:
                state, changed = attrs.evolve(state, installed_version=config.version), True
            if changed:
                save_state(config.state_dir, state)
        return cls(config.state_dir, state)

    def reload(self) -> DeviceState:
        """Read the state from disk (another writer may have changed it). Raises StateError."""
        self.state = load_state(self.state_dir)
        return self.state

    def adopt(self, state: DeviceState) -> None:
        """Take ``state``, just written by the install engine, as the current one."""
        self.state = state

    async def change(self, change: Callable[[DeviceState], DeviceState]) -> DeviceState:
        """Apply ``change`` to the state on disk and save it; returns the new state.

        Changes are serialised with each other and, through the install lock
        (journal.install_lock), with the install engine's own writes, so no
        writer ever loses another's write.
        Raises StateError, or a FilesystemError/DiskFullError from saving.
        """

        def work() -> DeviceState:
            # Under the install engine's file lock: apply, rollback and the
            # trial write state.json from their own thread (or process), and a
            # read-modify-write that straddled one of them put the old
            # installed_version back (a device lying about its version; seen
            # when an identical release applied in milliseconds while the
            # history flusher removed acknowledged entries).
            with install_lock(self.state_dir):
                state = change(load_state(self.state_dir))
                save_state(self.state_dir, state)
            return state

        async with self._writing:
            self.state = await trio.to_thread.run_sync(work)
        return self.state


class Reporter(Protocol):
    """Live progress and the outcome history (reporting.py's OutcomeReporter)."""

    async def progress(
        self,
        state: str,
        version: str = "",
        *,
        push_id: str = "",
        done: int = 0,
        total: int = 0,
        error: str | None = None,
        check: bool = False,
    ) -> None:
        """Report a step: the on_progress hook, the log, and ``update_progress``.

        ``check``: the step belongs to a check for updates (not held back otherwise).
        """

    async def record(
        self, event: str, version: str | None, error: str | None = None, push_id: str = ""
    ) -> None:
        """Persist an outcome in the history and get it to the releaser (now or later)."""

    def poke(self) -> None:
        """Send the history soon; callable from any thread."""


class Link(Protocol):
    """The releaser session as the steps use it (session.py's ReleaserLink)."""

    @property
    def connected(self) -> bool:
        """True while a live, authenticated connection is up."""

    @property
    def server_hello(self) -> HelloResult | None:
        """The releaser's hello result on the live connection (root version, freshness)."""

    @property
    def hello_nonce(self) -> bytes | None:
        """The nonce this device sent in the live connection's hello (§8.6)."""

    async def wait_connected(self, timeout: float) -> Peer:
        """The live peer, waiting at most ``timeout``. Raises Unreachable."""

    async def request(self, method: str, params: object, timeout: float) -> object:
        """One request within ``timeout``. Raises Unreachable or RpcError."""

    async def notify(self, method: str, params: object) -> bool:
        """Send a notification if connected; False if it could not be sent."""


class Spawner:
    """Starts background tasks in the updater's nursery while it runs."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def attach(self, nursery: trio.Nursery | None) -> None:
        """The nursery tasks go to from now on (None: the updater stopped)."""
        self._nursery = nursery

    def start_soon(self, task: Callable[[], Awaitable[object]]) -> bool:
        """Start ``task``; False (and nothing started) if the updater is not running."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(task)
        return True


@attrs.frozen(kw_only=True)
class UpdateContext:
    """What every step of an update is given (see the module docstring)."""

    config: UpdaterConfig
    layout: StateLayout
    #: the newest trusted root (roots.py): the release keys come from it (§8.5).
    roots: TrustedRoots
    store: StateStore
    reporter: Reporter
    link: Link
    spawner: Spawner
    #: LAN peer delivery (p2p_agent.py); None when ``p2p`` is off.
    p2p: DeviceP2P | None = None


__all__ = ["Link", "Reporter", "Spawner", "StateStore", "UpdateContext"]
