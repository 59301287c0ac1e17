"""Trial of a freshly applied version: confirm it, or roll it back.

After :func:`fleetpush.client.install.apply_staged` the new version is *on
trial* (``DeviceState.trial``). Run mode must:

1. call :func:`begin_start` before every start of the app. It persists
   ``attempts + 1`` *before* the start, so a version that crashes (or hangs
   the device) on start is rolled back after ``max_starts`` starts instead
   of looping forever;
2. call :func:`confirm` once the app reports healthy: the trial ends, the
   version is committed, its backup is kept;
3. call :func:`check_trial` periodically: past the deadline without a
   confirmation, the version is rolled back.

A rolled-back version is added to ``bad_releases`` and not applied again
unless an operator pushes it explicitly (``StagedInfo.forced``).
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Final

import attrs
from attrs import frozen

from .errors import StateError
from .install import (
    RollbackResult,
    _rollback_locked,
    install_lock,
    prune_updates,
    read_journal,
    recover,
)
from .layout import StateLayout
from .state import DeviceState, load_state, save_state

StrPath = str | os.PathLike[str]

#: Starts of a new version without a confirmation before it is rolled back.
DEFAULT_MAX_STARTS: Final = 2


class Verdict(enum.Enum):
    NO_TRIAL = "no-trial"
    ON_TRIAL = "on-trial"
    EXPIRED = "expired"
    TOO_MANY_STARTS = "too-many-starts"


@frozen(kw_only=True)
class TrialOutcome:
    verdict: Verdict
    #: set if the verdict made us roll back.
    rollback: RollbackResult | None = None
    #: the trial's start count after this call.
    attempts: int = 0


def evaluate(state: DeviceState, now: float, max_starts: int = DEFAULT_MAX_STARTS) -> Verdict:
    """What the trial rules say about ``state`` at ``now`` (pure)."""
    trial = state.trial
    if trial is None or trial.version != state.installed_version:
        return Verdict.NO_TRIAL
    if now >= trial.deadline:
        return Verdict.EXPIRED
    if trial.attempts >= max_starts:
        return Verdict.TOO_MANY_STARTS
    return Verdict.ON_TRIAL


def _decide(
    state_dir: StrPath, app_root: StrPath, now: float, max_starts: int, *, starting: bool
) -> TrialOutcome:
    layout = StateLayout.of(state_dir)
    if read_journal(layout.root) is not None:
        recover(layout.root, app_root, now)
    with install_lock(layout.root):
        state = load_state(layout.root, now)
        verdict = evaluate(state, now, max_starts)
        if verdict in (Verdict.EXPIRED, Verdict.TOO_MANY_STARTS):
            assert state.trial is not None
            reason = (
                f"not confirmed within {state.trial.deadline - state.trial.started_at:.0f}s"
                if verdict is Verdict.EXPIRED
                else f"{state.trial.attempts} starts without a confirmation"
            )
            result = _rollback_locked(layout, Path(app_root), reason, now)
            return TrialOutcome(verdict=verdict, rollback=result, attempts=state.trial.attempts)
        if verdict is Verdict.ON_TRIAL and starting:
            assert state.trial is not None
            trial = attrs.evolve(state.trial, attempts=state.trial.attempts + 1)
            save_state(layout.root, attrs.evolve(state, trial=trial))
            return TrialOutcome(verdict=verdict, attempts=trial.attempts)
        return TrialOutcome(
            verdict=verdict, attempts=state.trial.attempts if state.trial else 0
        )


def begin_start(
    state_dir: StrPath, app_root: StrPath, now: float, max_starts: int = DEFAULT_MAX_STARTS
) -> TrialOutcome:
    """Call before starting the app: counts the start, or rolls back.

    Returns ON_TRIAL (start counted and persisted), NO_TRIAL (nothing to do),
    or EXPIRED / TOO_MANY_STARTS with the rollback done: start the restored
    version. Raises what :func:`install.rollback` raises.
    """
    return _decide(state_dir, app_root, now, max_starts, starting=True)


def check_trial(
    state_dir: StrPath, app_root: StrPath, now: float, max_starts: int = DEFAULT_MAX_STARTS
) -> TrialOutcome:
    """Periodic check: roll back if the trial expired or the start budget is spent."""
    return _decide(state_dir, app_root, now, max_starts, starting=False)


def confirm(state_dir: StrPath, now: float, version: str | None = None) -> DeviceState:
    """Commit the version on trial (the app is healthy). Idempotent.

    ``version``, if given, must be the installed version. Keeps the backup
    (for an operator rollback) and drops staging directories no longer
    needed. Raises :class:`StateError` if ``version`` is not installed.
    """
    layout = StateLayout.of(state_dir)
    with install_lock(layout.root):
        state = load_state(layout.root, now)
        if version is not None and version != state.installed_version:
            raise StateError(f"cannot confirm {version}: {state.installed_version} is installed")
        if state.trial is not None:
            committed = state.trial.version
            state = attrs.evolve(state, trial=None).record(now, "committed", committed)
            save_state(layout.root, state)
        prune_updates(layout.root, {state.staged.version} if state.staged else set())
        return state
