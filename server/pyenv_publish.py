"""A release's Python environment, resolved on the publishing machine (issue 12).

The device builds the env offline (client/pyenv.py), so everything it needs
travels in the release as ordinary files, signed like the rest (specs/
PROTOCOL.md §7.3.1), under the reserved prefix :data:`PREFIX`:

    .fleetpush/python/requirements.lock   ``name==version --hash=sha256:...``
    .fleetpush/python/wheels/*.whl        every wheel the lock names

Resolution is pip's, never ours: ``pip download --only-binary=:all:`` of the
requirements, from the publisher's usual index or, with a wheelhouse,
``--no-index --find-links WHEELHOUSE`` (a hash-pinned requirements file is
then checked by pip itself). The lock is written from the downloaded wheels'
own bytes, so it names exactly the files shipped. An unchanged wheel is an
unchanged file, which a device copies from its installed release instead of
downloading it (client/download.py).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from attrs import frozen
from fleetpush.protocol.manifest import PythonEnv

from .errors import PublishError

PREFIX: Final = ".fleetpush/python"
WHEELS: Final = f"{PREFIX}/wheels"
LOCK: Final = f"{PREFIX}/requirements.lock"

#: ``run(argv) -> (exit code, combined output)``.
Runner = Callable[[Sequence[str]], tuple[int, str]]

_MODULE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _run(argv: Sequence[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, check=False, timeout=1800,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, str(e)
    return done.returncode, done.stdout.decode(errors="replace")


@frozen
class EnvFiles:
    """What an env adds to a release: (manifest path, file to read) pairs and ``python``."""

    files: list[tuple[str, Path]]
    python: PythonEnv


def _last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


def _project(wheel: Path) -> tuple[str, str]:
    """(normalised project name, version) from a wheel's file name (PEP 427)."""
    parts = wheel.name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise PublishError(f"{wheel.name} is not a wheel file name")
    return re.sub(r"[-_.]+", "-", parts[0]).lower(), parts[1]


def write_lock(wheels: Sequence[Path], dest: Path) -> None:
    """A ``--require-hashes`` lock naming ``wheels``, one line per project (several
    wheels of one version, e.g. for two platforms, give several hashes).

    Raises PublishError if a project has wheels of two versions.
    """
    by_project: dict[str, tuple[str, list[str]]] = {}
    for w in sorted(wheels):
        name, version = _project(w)
        digest = hashlib.sha256(w.read_bytes()).hexdigest()
        seen = by_project.setdefault(name, (version, []))
        if seen[0] != version:
            raise PublishError(
                f"the wheels hold {name} {seen[0]} and {version}: keep one, or pass "
                "--requirements to choose"
            )
        seen[1].append(digest)
    lines = [
        f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in hashes)
        for name, (version, hashes) in sorted(by_project.items())
    ]
    dest.write_text("# written by fleetpush release publish; pip --require-hashes form\n"
                    + "\n".join(lines) + "\n")


def resolve_env(
    work: Path,
    *,
    requirements: Path | None = None,
    wheelhouse: Path | None = None,
    imports: Sequence[str] = (),
    python_version: str | None = None,
    platforms: Sequence[str] = (),
    run: Runner = _run,
) -> EnvFiles:
    """Download (or pick from ``wheelhouse``) the wheels and write the lock under ``work``.

    ``requirements``: resolved by ``pip download`` (from ``wheelhouse`` only, if
    given). Without it, every wheel of ``wheelhouse`` is shipped.
    Raises PublishError with pip's last error line.
    """
    if requirements is None and wheelhouse is None:
        raise PublishError("a Python environment needs --requirements or --wheelhouse")
    for mod in imports:
        if not _MODULE.match(mod):
            raise PublishError(f"--import {mod!r} is not a dotted module name")
    for given in (requirements, wheelhouse):
        if given is not None and not given.exists():
            raise PublishError(f"{given} does not exist")
    if wheelhouse is not None and not wheelhouse.is_dir():
        raise PublishError(f"--wheelhouse {wheelhouse} is not a directory")
    out = work / "wheels"
    out.mkdir(parents=True, exist_ok=True)
    if requirements is not None:
        argv = [
            sys.executable, "-m", "pip", "download", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--quiet",
            "-d", str(out), "-r", str(requirements),
        ]
        if wheelhouse is not None:
            argv += ["--no-index", "--find-links", str(wheelhouse)]
        if python_version:
            argv += ["--python-version", python_version]
        for p in platforms:
            argv += ["--platform", p]
        code, output = run(argv)
        if code != 0:
            where = f" from {wheelhouse}" if wheelhouse is not None else ""
            raise PublishError(f"pip could not get the wheels{where}: {_last_error(output)}")
        wheels = sorted(out.glob("*.whl"))
    else:
        assert wheelhouse is not None
        wheels = sorted(wheelhouse.glob("*.whl"))
    if not wheels:
        raise PublishError("no wheels to ship (an empty requirements file or wheelhouse)")
    lock = work / "requirements.lock"
    write_lock(wheels, lock)
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    return EnvFiles(
        files=[(LOCK, lock), *((f"{WHEELS}/{w.name}", w) for w in wheels)],
        python=PythonEnv(lock=LOCK, wheels=WHEELS, imports=list(imports), python=version),
    )


__all__ = ["LOCK", "PREFIX", "WHEELS", "EnvFiles", "resolve_env", "write_lock"]
