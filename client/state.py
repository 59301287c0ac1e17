"""The device's persisted state: ``<state>/state.json`` (see layout.py).

One JSON document, always replaced atomically (fsutil.atomic_write_json).
Before each save the current file is copied, also atomically, to
``state.json.bak``; :func:`load_state` falls back to that copy if
``state.json`` is unreadable, so a corrupted state file costs at most the last
change, never the trust high-water mark of earlier ones.

``high_water`` is the highest manifest sequence the device has trusted. The
trust rules (fleetpush.protocol.trust) refuse anything below it, so it must
survive restarts and must only grow: :func:`save_state` refuses to write a
lower value than the one on disk.

Unknown keys are kept in ``extra`` so an older client does not drop fields a
newer one wrote (the manifest policy of STYLE.md §3 applied to our own file).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
from attrs import field, frozen
from fleetpush.protocol import codec
from fleetpush.protocol.errors import DecodeError

from .errors import StateError
from .fsutil import atomic_write_bytes, atomic_write_json, read_json
from .layout import StateLayout

STATE_FORMAT: Final = 1

#: Events kept until the releaser has been told about them; the oldest are
#: dropped beyond this so a device offline for months cannot grow without bound.
MAX_HISTORY: Final = 50

#: Event names recorded in ``history`` (the ``state`` key of an event).
EVENTS: Final = (
    "applied",
    "apply-failed",
    "apply-interrupted",
    "committed",
    "rolled-back",
    "rollback-failed",
    "state-restored",
    "repaired",  # a corrupt journal, state file or key repaired at start (repair.py)
)


@frozen(kw_only=True)
class StagedInfo:
    """An update downloaded, verified whole and waiting to be applied."""

    version: str
    sequence: int
    restart: bool = True
    push_id: str | None = None
    #: an operator pushed it explicitly: apply even if it is in bad_releases.
    forced: bool = False
    #: apply attempts so far (persisted *before* each attempt, see install.py).
    attempts: int = 0
    #: an operator's ``push --stage`` (a push with restart false): it waits for
    #: ``fleetpush apply`` (or another push); periodic checks and a starting
    #: agent never apply it (issue 11, item 5; specs/PROTOCOL.md §7.4).
    held: bool = False


@frozen(kw_only=True)
class TrialInfo:
    """A freshly applied version that has not been confirmed yet."""

    version: str
    previous_version: str | None
    #: backups/<name> that undoes the apply, None if nothing to roll back to.
    backup_dir: str | None
    started_at: float
    deadline: float
    #: starts of the new version so far (persisted *before* each start).
    attempts: int = 0


#: ``DeviceState.extra`` key: the root version whose ``sequence_resets`` last
#: lowered ``high_water`` (specs/PROTOCOL.md §8.5).
RESET_BY_ROOT: Final = "high_water_reset_by_root"


@frozen(kw_only=True)
class DeviceState:
    format: int = STATE_FORMAT
    app: str = ""
    installed_version: str | None = None
    installed_sequence: int = 0
    high_water: int = 0
    bad_releases: tuple[str, ...] = ()
    staged: StagedInfo | None = None
    trial: TrialInfo | None = None
    last_result: dict[str, Any] | None = None
    history: tuple[dict[str, Any], ...] = ()
    extra: dict[str, Any] = field(factory=dict)

    def raise_high_water(self, sequence: int) -> DeviceState:
        """This state with ``high_water`` at least ``sequence`` (it never goes down)."""
        return attrs.evolve(self, high_water=max(self.high_water, sequence))

    def reset_high_water(self, sequence: int, root_version: int) -> DeviceState:
        """This state with ``high_water`` lowered to ``sequence`` by root ``root_version``.

        The one way the mark goes down (specs/PROTOCOL.md §8.5, recovery from a
        fast-forward): a signed root ordered it. The root's version is kept in
        ``extra`` so :func:`save_state` can tell this from a bug.
        """
        extra = {**self.extra, RESET_BY_ROOT: root_version}
        return attrs.evolve(
            self,
            high_water=min(self.high_water, sequence),
            installed_sequence=min(self.installed_sequence, sequence),
            extra=extra,
        )

    def is_bad(self, version: str) -> bool:
        return version in self.bad_releases

    def mark_bad(self, version: str) -> DeviceState:
        if version in self.bad_releases:
            return self
        return attrs.evolve(self, bad_releases=(*self.bad_releases, version))

    def clear_bad(self, version: str) -> DeviceState:
        """An operator pushed ``version`` again: allow it once more."""
        return attrs.evolve(
            self, bad_releases=tuple(v for v in self.bad_releases if v != version)
        )

    def record(
        self, now: float, event: str, version: str | None, error: str | None = None
    ) -> DeviceState:
        """Append an event to ``history`` (bounded) and make it ``last_result``."""
        entry: dict[str, Any] = {"time": now, "state": event, "version": version}
        if error is not None:
            entry["error"] = error
        history = (*self.history, entry)[-MAX_HISTORY:]
        return attrs.evolve(self, history=history, last_result=entry)

    def acknowledge_history(self, count: int) -> DeviceState:
        """Drop the ``count`` oldest events once the releaser has received them."""
        return attrs.evolve(self, history=self.history[max(count, 0) :])

    def to_json(self) -> dict[str, Any]:
        wire: dict[str, Any] = codec.to_wire(self)
        return wire

    @classmethod
    def from_json(cls, data: object) -> DeviceState:
        """Raises :class:`StateError` for a document of the wrong shape."""
        try:
            state = codec.from_wire(cls, data, "state")
        except DecodeError as e:
            raise StateError(f"state.json has the wrong shape: {e}") from e
        if state.format != STATE_FORMAT:
            raise StateError(f"state.json format {state.format} is not supported")
        return state


def _read(path: str | os.PathLike[str]) -> DeviceState:
    try:
        return DeviceState.from_json(read_json(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise StateError(f"{path} is not valid JSON: {e}") from e


def load_state(state_dir: str | os.PathLike[str], now: float | None = None) -> DeviceState:
    """The persisted state; a fresh default if the device has never saved one.

    Falls back to ``state.json.bak`` (and records a ``state-restored`` event
    once saved) if ``state.json`` is corrupt. Raises :class:`StateError` if
    both are unusable: better to stop than to forget the trust high-water mark.
    """
    layout = StateLayout.of(state_dir)
    try:
        return _read(layout.state_file)
    except FileNotFoundError:
        if not layout.state_backup.exists():
            return DeviceState()
        error: StateError | None = StateError(f"{layout.state_file} is missing")
    except StateError as e:
        error = e
    try:
        state = _read(layout.state_backup)
    except FileNotFoundError:
        raise StateError(f"{error}; and there is no {layout.state_backup}") from error
    except StateError as e:
        raise StateError(f"{error}; and the backup is unusable too: {e}") from error
    when = time.time() if now is None else now
    return state.record(when, "state-restored", state.installed_version, str(error))


def save_state(state_dir: str | os.PathLike[str], state: DeviceState) -> None:
    """Persist ``state`` atomically, keeping the previous good file as ``.bak``.

    Raises :class:`StateError` if ``state.high_water`` is below the one on
    disk (a programming error that would re-open rollback attacks), and
    :class:`DiskFullError`/:class:`FilesystemError` if the write fails.
    """
    layout = StateLayout.of(state_dir)
    try:
        raw = layout.state_file.read_bytes()
    except FileNotFoundError:
        raw = None
    except OSError as e:
        raise StateError(f"cannot read {layout.state_file}: {e}") from e
    if raw is not None:
        try:
            current: DeviceState | None = DeviceState.from_json(json.loads(raw))
        except (ValueError, UnicodeDecodeError, StateError):
            current = None  # corrupt: do not let it overwrite the good .bak
        if current is not None:
            reset = state.extra.get(RESET_BY_ROOT, 0) > current.extra.get(RESET_BY_ROOT, 0)
            if state.high_water < current.high_water and not reset:
                raise StateError(
                    f"refusing to lower high_water from {current.high_water} to {state.high_water}"
                )
            atomic_write_bytes(layout.state_backup, raw, 0o600)
    atomic_write_json(layout.state_file, state.to_json(), 0o600)


def update_state(
    state_dir: str | os.PathLike[str], change: Callable[[DeviceState], DeviceState],
) -> DeviceState:
    """Load, apply ``change``, save; returns the saved state."""
    state = change(load_state(state_dir))
    save_state(state_dir, state)
    return state
