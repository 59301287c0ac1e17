"""Running the app's ``migrate_command`` between installing the files and starting the app.

The command runs with the app root as its working directory, in the new
release's Python env if it ships one (``{python}`` and ``{venv}`` in the
command, the env's ``bin`` first on PATH: pyenv.py), and, in its
environment, what it needs to know::

    FLEETPUSH_SCHEMA_FROM   the schema the data is at ("" when unknown)
    FLEETPUSH_SCHEMA_TO     the release's schema_version
    FLEETPUSH_APP_ROOT      the app root (absolute)
    FLEETPUSH_VERSION       the release being installed
    FLEETPUSH_FROM_VERSION  the release installed before ("" on a first install)

Exit 0 is success. Any other exit, a timeout (``migrate_timeout``; the whole
process group is killed) or a command that cannot start is a failure, and its
message carries the command's last non-empty stderr line, which is what an
operator needs to see in ``watch`` (the install engine then restores code and
data, install.py).

The command is the agent's child only while the agent lives: it is started
with a parent-death signal (``PR_SET_PDEATHSIG``, SIGKILL), so a kill -9 of
the agent mid-migration also stops the migration before recovery restores
the data under it. It leads its own process group, so a timeout reaches what
it spawned.

Synchronous on purpose: it runs inside the journaled apply, in the worker
thread the agent already runs the install engine in.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from attrs import frozen

from .errors import ApplyError
from .pyenv import child_env, expand_command

#: stderr kept from the migration (its tail: the last line is what counts).
STDERR_TAIL: Final = 64 * 1024
_PR_SET_PDEATHSIG: Final = 1


class MigrationFailed(ApplyError):
    """The migration command failed; code and data were (or will be) restored."""


@frozen(kw_only=True)
class Migration:
    command: tuple[str, ...]
    schema_from: int | None
    schema_to: int
    version: str
    from_version: str | None
    timeout: float
    #: the release's Python env (pyenv.py), built before the app stopped: the
    #: migration runs in it, as the new version will ({python}, {venv}, PATH).
    venv: Path | None = None

    def argv(self) -> list[str]:
        return expand_command(self.command, self.venv)

    def env(self, app_root: Path) -> dict[str, str]:
        return {
            **child_env(os.environ, self.venv),
            "FLEETPUSH_SCHEMA_FROM": "" if self.schema_from is None else str(self.schema_from),
            "FLEETPUSH_SCHEMA_TO": str(self.schema_to),
            "FLEETPUSH_APP_ROOT": str(app_root.absolute()),
            "FLEETPUSH_VERSION": self.version,
            "FLEETPUSH_FROM_VERSION": self.from_version or "",
        }

    def describe(self) -> str:
        start = "unknown" if self.schema_from is None else str(self.schema_from)
        return f"migration of the data from schema {start} to {self.schema_to}"


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started us dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: a kill -9 of the agent may leave the migration running


def last_line(stderr: bytes) -> str:
    for line in reversed(stderr.decode(errors="replace").splitlines()):
        if line.strip():
            return line.strip()[:300]
    return ""


def run_migration(
    migration: Migration,
    app_root: Path,
    *,
    spawn: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
) -> None:
    """Run ``migration`` in ``app_root``; returns on exit 0.

    Raises :class:`MigrationFailed` (non-zero exit, timeout, cannot start).
    """
    what = migration.describe()
    argv: Sequence[str] = migration.argv()
    try:
        proc = spawn(
            list(argv),
            cwd=str(app_root),
            env=migration.env(app_root),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # only prctl: safe after fork
        )
    except OSError as e:
        raise MigrationFailed(f"{what} failed: cannot run {argv[0]}: {e.strerror or e}") from e
    tail = bytearray()

    def drain() -> None:
        assert proc.stderr is not None
        with proc.stderr:
            while block := proc.stderr.read(65536):
                tail.extend(block)
                del tail[:-STDERR_TAIL]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=migration.timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.wait()
        reader.join(5)
        line = last_line(bytes(tail))
        raise MigrationFailed(
            f"{what} failed: no result within {migration.timeout:g}s (migrate_timeout)"
            + (f"; last error: {line}" if line else "")
        ) from None
    reader.join(5)
    if code != 0:
        line = last_line(bytes(tail)) or "(no error output)"
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise MigrationFailed(f"{what} failed ({how}): {line}")


__all__ = ["Migration", "MigrationFailed", "last_line", "run_migration"]
