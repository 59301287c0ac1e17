"""Apply mode: the process the updater re-execs into to install an update.

``python -m fleetpush.client.applymode --state DIR --root DIR --version V [--no-start]``

1. reads ``updates/<V>/saved_args.json`` (the run-mode process to come back to);
2. :func:`install.recover` finishes or undoes any interrupted operation;
3. :func:`install.apply_staged` installs V (failure: the old version stays
   and the failure is recorded in the state history);
4. ``os.execv`` the saved argv (the app, or the agent that started all this),
   *whatever happened*, so the device keeps running; a saved Python command
   runs under the installed release's env interpreter if it has one
   (pyenv.reexec_target). With ``--no-start`` it
   exits instead: 0 applied or already installed, 1 apply failed, 2 bad usage.

Run mode is exec'd even if recovery failed: its own start calls recover()
again, and a device that stops running cannot be updated out of trouble.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, NoReturn

from attrs import frozen
from fleetpush.protocol import codec
from fleetpush.protocol.errors import DecodeError

from .data_settings import DataSettings
from .errors import StagingError, UpdaterError
from .fsutil import atomic_write_json, read_json
from .install import apply_staged, recover
from .layout import StateLayout
from .pyenv import reexec_target

StrPath = str | os.PathLike[str]

log = logging.getLogger("fleetpush.client.applymode")


@frozen(kw_only=True)
class SavedArgs:
    argv: list[str]
    executable: str
    cwd: str
    version: str
    timestamp: float
    #: DataSettings.to_json() of the app's config: data backed up and migrated
    #: in apply mode as under the agent (issue 12). None: code only.
    data: dict[str, Any] | None = None


def write_saved_args(
    state_dir: StrPath,
    version: str,
    argv: list[str],
    executable: str,
    cwd: str,
    *,
    now: float | None = None,
    data: DataSettings | None = None,
) -> SavedArgs:
    """Record the process apply mode execs afterwards (``updates/<V>/saved_args.json``)."""
    if not argv:
        raise StagingError("saved argv must not be empty")
    saved = SavedArgs(
        argv=list(argv),
        executable=executable,
        cwd=cwd,
        version=version,
        timestamp=time.time() if now is None else now,
        data=None if data is None else data.to_json(),
    )
    atomic_write_json(StateLayout.of(state_dir).saved_args(version), codec.to_wire(saved))
    return saved


def read_saved_args(state_dir: StrPath, version: str) -> SavedArgs:
    """Raises :class:`StagingError` if missing or malformed."""
    path = StateLayout.of(state_dir).saved_args(version)
    try:
        saved = codec.from_wire(SavedArgs, read_json(path), "saved_args")
    except FileNotFoundError as e:
        raise StagingError(f"{path} is missing") from e
    except (ValueError, DecodeError) as e:
        raise StagingError(f"{path} is malformed: {e}") from e
    if not saved.argv:
        raise StagingError(f"{path} has an empty argv")
    return saved


def apply_mode_argv(
    state_dir: StrPath, app_root: StrPath, version: str, start: bool = True
) -> list[str]:
    """The argv :func:`reexec_into_apply_mode` execs."""
    argv = [
        sys.executable, "-m", "fleetpush.client.applymode",
        "--state", os.fspath(state_dir), "--root", os.fspath(app_root), "--version", version,
    ]
    return argv if start else [*argv, "--no-start"]


def reexec_into_apply_mode(
    state_dir: StrPath, app_root: StrPath, version: str, start: bool = True
) -> NoReturn:
    """Replace this process with apply mode for ``version`` (call write_saved_args first)."""
    argv = apply_mode_argv(state_dir, app_root, version, start)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)  # noqa: S606 - exec is the point; no shell involved


def run(
    state_dir: StrPath,
    app_root: StrPath,
    version: str,
    now: float | None = None,
    data: DataSettings | None = None,
) -> bool:
    """Steps 2 and 3 of the module docstring; True if ``version`` is installed after."""
    now = time.time() if now is None else now
    try:
        retention = None if data is None else data.retention
        done = recover(state_dir, app_root, now, retention=retention)
        if done is not None:
            log.warning("recovered an interrupted %s: %s", done.op, done.action)
    except UpdaterError as e:
        log.error("recovery failed: %s", e)
        return False
    try:
        result = apply_staged(state_dir, app_root, version, now, data=data)
    except UpdaterError as e:
        log.error("apply of %s failed, previous version kept: %s", version, e)
        try:
            recover(state_dir, app_root, now)  # if the in-process undo failed
        except UpdaterError as e2:
            log.error("recovery after the failed apply failed: %s", e2)
        return False
    log.info("%s installed (changed: %s)", result.version, result.changed)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetpush.client.applymode")
    parser.add_argument("--state", required=True, help="state directory")
    parser.add_argument("--root", required=True, help="app root")
    parser.add_argument("--version", required=True, help="staged version to apply")
    parser.add_argument("--no-start", action="store_true", help="exit instead of exec")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fleetpush applymode: %(message)s")
    saved: SavedArgs | None = None
    if not args.no_start:
        try:
            saved = read_saved_args(args.state, args.version)
        except (UpdaterError, OSError) as e:
            log.error("cannot read saved args, will not start anything: %s", e)
    data = None
    if saved is not None and saved.data is not None:
        try:
            data = DataSettings.from_json(saved.data)
        except ValueError as e:
            log.error("saved data settings are malformed, backing up code only: %s", e)
    ok = run(args.state, args.root, args.version, data=data)
    if args.no_start:
        return 0 if ok else 1
    if saved is None:
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.chdir(saved.cwd)
    except OSError as e:
        log.error("cannot chdir to %s: %s", saved.cwd, e)
    # The installed release's env interpreter when it has one (pyenv.py).
    try:
        exe, argv_out = reexec_target(StateLayout.of(args.state), saved.executable, saved.argv)
    except UpdaterError as e:
        log.error("cannot read the installed release's environment: %s", e)
        exe, argv_out = saved.executable, saved.argv
    try:
        os.execv(exe, argv_out)  # noqa: S606 - our own saved argv
    except OSError as e:
        log.error("cannot exec %s: %s", exe, e)
    return 2


if __name__ == "__main__":
    sys.exit(main())
