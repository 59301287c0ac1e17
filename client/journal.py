"""The apply / rollback journal (``<state>/journal.json``), lock and crash points.

See install.py for the phases and the recovery policy of each.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Iterator
from typing import Any, Final

from attrs import field, frozen
from fleetpush.protocol import codec
from fleetpush.protocol.errors import DecodeError

from .errors import StateError
from .fsutil import atomic_write_json, fsync_dir, read_json
from .layout import StateLayout

StrPath = str | os.PathLike[str]

#: Environment variable naming the crash point to die at (tests only).
CRASH_ENV: Final = "FLEETPUSH_TEST_CRASH_AT"

#: Every named crash point, in the order an apply / recovery / rollback meets them.
CRASH_POINTS: Final = (
    "apply-after-journal",  # journal (phase backup) written, nothing else
    "apply-mid-backup",  # first file linked (or copied) into the partial backup
    "apply-mid-data-backup",  # first data path copied into the partial backup (data_backup.py)
    "apply-after-backup",  # backup complete and renamed; journal still says backup
    "apply-install-started",  # journal says install; app root not touched yet
    "apply-mid-remove",  # first old-only file removed from the app root
    "apply-mid-file",  # first new file linked (or copied) to a temp name, not renamed
    "apply-mid-install",  # first new file renamed into place
    "apply-after-install",  # every new file in place; journal still says install
    "apply-migrate-started",  # journal says migrate; the migration not started yet
    "apply-after-migrate",  # the migration exited 0; journal still says migrate
    "apply-after-commit-journal",  # journal says commit
    "apply-after-manifest",  # installed/manifest.signed replaced
    "apply-after-state",  # state.json says the new version; journal still present
    "undo-mid-restore",  # recovery undoing an apply: first saved file restored
    "undo-mid-data-restore",  # undoing a migration: first data path restored
    "rollback-after-journal",  # rollback journal written
    "rollback-mid-restore",  # first saved file restored
    "rollback-mid-data-restore",  # first data path restored (a rollback across a migration)
    "rollback-after-restore",  # every file restored; manifest and state not yet
    "rollback-after-state",  # state.json says the old version; journal still present
)

#: Crash points outside the install engine (tests of issue 10, items 10 and 11).
SESSION_CRASH_POINTS: Final = (
    "push-after-ack",  # a push persisted and its ack sent to the releaser; nothing else done
)

#: Crash points of a release's env build (pyenv.py; issue 12), before any apply.
ENV_CRASH_POINTS: Final = (
    "env-mid-build",  # the venv created, its packages not installed
    "env-built",  # the venv complete (.complete written); nothing applied yet
)

#: Default time a new version has to confirm itself before it is rolled back.
DEFAULT_TRIAL_SECONDS: Final = 600.0

JOURNAL_FORMAT: Final = 1


def crash_point(name: str) -> None:
    """SIGKILL this process if ``$FLEETPUSH_TEST_CRASH_AT`` is ``name`` (tests only)."""
    if name not in (*CRASH_POINTS, *SESSION_CRASH_POINTS, *ENV_CRASH_POINTS):
        raise ValueError(f"unknown crash point {name!r}")
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def install_lock(state_dir: StrPath) -> Iterator[None]:
    """Hold ``<state>/lock`` (flock) so two processes never apply at once."""
    layout = StateLayout.of(state_dir)
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(layout.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StateError(f"cannot open {layout.lock_file}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- journal -------------------------------------------------------------------------------


@frozen(kw_only=True)
class Journal:
    format: int = JOURNAL_FORMAT
    id: str
    op: str  # "apply" | "rollback"
    phase: str  # apply: "backup" | "install" | "migrate" | "commit"; rollback: "restore"
    from_version: str | None
    to_version: str | None
    to_sequence: int
    backup: str
    now: float
    trial_seconds: float = DEFAULT_TRIAL_SECONDS
    install: list[str] = field(factory=list)
    remove: list[str] = field(factory=list)
    reason: str | None = None
    extra: dict[str, Any] = field(factory=dict)


def read_journal(state_dir: StrPath) -> Journal | None:
    """The pending journal, or None. Raises :class:`StateError` if it is corrupt."""
    path = StateLayout.of(state_dir).journal
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise StateError(f"{path} is corrupt; the app root needs manual checking: {e}") from e
    try:
        journal = codec.from_wire(Journal, data, "journal")
    except DecodeError as e:
        raise StateError(f"{path} has the wrong shape: {e}") from e
    if journal.op not in ("apply", "rollback"):
        raise StateError(f"{path}: unknown operation {journal.op!r}")
    return journal


def write_journal(layout: StateLayout, journal: Journal) -> None:
    atomic_write_json(layout.journal, codec.to_wire(journal), 0o600)


def remove_journal(layout: StateLayout) -> None:
    with contextlib.suppress(FileNotFoundError):
        layout.journal.unlink()
    fsync_dir(layout.root)
