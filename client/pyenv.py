"""Python environments of releases on the device: built offline, switched by a symlink.

A release may carry its Python environment as ordinary files: wheels under a
directory prefix and a hash-pinned lock (specs/PROTOCOL.md §7.3.1). This
module builds a venv from them and keeps one link pointing at the installed
version's venv::

    <state>/envs/<version>-<sequence>/   one venv per release, built at its
                                         final path (a venv records absolute
                                         paths in its scripts: it cannot move)
    <state>/envs/<name>/.complete        written last; an env dir without it is
                                         an interrupted build, deleted and rebuilt
    <state>/envs/current -> <name>       relative symlink to the installed
                                         version's env; absent when the
                                         installed version has none
    <state>/envs/.cache/                 uv's cache (uv only)

**The link is a function of ``installed/manifest.signed``** (:func:`sync_link`).
recovery.py calls it where the journal finishes an operation (finish_apply,
undo_apply, finish_rollback), right after the installed manifest is settled,
so a kill -9 anywhere is made consistent by ``recover()`` exactly like the
files: the link is replaced by rename (a temp-named symlink, ``os.replace``,
fsync of the directory), never removed first.

**Building** (:func:`prepare`) never touches the network: ``uv pip install
--offline --no-index`` when uv is found, else ``python -m venv`` and pip with
``--no-index``; both with ``--require-hashes --find-links <wheels> -r
<lock>`` and with every pip/uv configuration file and variable ignored (a
device's pip.conf must not add an index or a constraint). The lock and the
wheels are read where the stager put them (``updates/<v>/files``) or, when a
file is unchanged from the installed release (which the stager need not
stage), from the app root, and each is checked against its signed digest
first. Then the smoke check ``python -I -c "import a, b"``.

**Space**: :func:`space_needed` (the wheels x4 plus 32 MiB) is checked free
before a build, and a tool that fails with ENOSPC/EDQUOT raises
:class:`DiskFullError`, not :class:`EnvError`: env_step.py then reports the
failure without marking the release bad, so it is retried once space is freed.

Crash points (journal.py): ``env-mid-build`` (venv created, packages not
installed) and ``env-built`` (``.complete`` written, nothing applied).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from attrs import frozen
from fleetpush.protocol.hashing import new_hasher
from fleetpush.protocol.manifest import FileEntry, Manifest

from .backup import list_backups
from .errors import ApplyError, DiskFullError, StateError, UpdaterError, wrap_oserror
from .fsutil import (
    atomic_write_json,
    check_free_space,
    fsync_dir,
    open_for_read,
    read_chunks,
    remove_tree,
)
from .journal import crash_point
from .layout import StateLayout, version_dir_name
from .staging import load_installed_manifest, load_staged

ENVS_DIR: Final = "envs"
CURRENT: Final = "current"
COMPLETE: Final = ".complete"
CACHE_DIR: Final = ".cache"
_LINK_TEMP: Final = ".current-"

#: What a build or smoke check may take before it counts as failed.
DEFAULT_BUILD_TIMEOUT: Final = 900.0

#: ``run(argv, env, cwd, timeout) -> (exit code, combined output)``.
Runner = Callable[[Sequence[str], Mapping[str, str], str, float], tuple[int, str]]


class EnvError(ApplyError):
    """A release's Python environment cannot be built or fails its smoke check."""


def run_subprocess(
    argv: Sequence[str], env: Mapping[str, str], cwd: str, timeout: float
) -> tuple[int, str]:
    """The default :data:`Runner`: a real process, stdin closed, output captured."""
    try:
        done = subprocess.run(
            list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        return -1, f"{Path(argv[0]).name} did not finish within {timeout:g}s"
    except OSError as e:
        return -1, f"cannot run {argv[0]}: {e.strerror or e}"
    return done.returncode, done.stdout.decode(errors="replace")


@frozen(kw_only=True)
class BuildSettings:
    """How envs are built: the base interpreter, the tool, a time limit."""

    #: the interpreter the venv is made from (default: the agent's own).
    python: str = sys.executable
    #: "auto" (uv when found, else pip), "uv" or "pip".
    tool: str = "auto"
    timeout: float = DEFAULT_BUILD_TIMEOUT
    run: Runner = run_subprocess


# --- names and the link --------------------------------------------------------------------


def envs_dir(layout: StateLayout) -> Path:
    return layout.root / ENVS_DIR


def env_name(manifest: Manifest) -> str:
    """``<version>-<sequence>``: a canonical version never contains ``-`` (PEP 440)."""
    return f"{version_dir_name(manifest.version)}-{manifest.sequence}"


def env_path(layout: StateLayout, manifest: Manifest) -> Path:
    return envs_dir(layout) / env_name(manifest)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def current_env(layout: StateLayout) -> Path | None:
    """The complete env ``current`` points at (resolved, so a running app keeps
    its env's path even if the link moves on), or None."""
    link = envs_dir(layout) / CURRENT
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return target if is_complete(target) else None


def _installed(layout: StateLayout) -> Manifest | None:
    found = load_installed_manifest(layout.root)
    return None if found is None else found[1]


def sync_link(layout: StateLayout) -> Path | None:
    """Point ``envs/current`` at the installed version's env, or remove it if that
    version has none. Idempotent; returns the target. Raises StateError,
    FilesystemError."""
    manifest = _installed(layout)
    envs = envs_dir(layout)
    link = envs / CURRENT
    name = env_name(manifest) if manifest is not None and manifest.python else None
    try:
        now = os.readlink(link)
    except FileNotFoundError:
        now = None
    except OSError as e:
        raise wrap_oserror(e, f"read {link}") from e
    if now == name:
        return None if name is None else envs / name
    if name is None:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        fsync_dir(envs)
        return None
    envs.mkdir(parents=True, exist_ok=True)
    temp = envs / f"{_LINK_TEMP}{secrets.token_hex(4)}"
    try:
        os.symlink(name, temp)  # relative: the state dir may be moved whole
        os.replace(temp, link)
    except OSError as e:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise wrap_oserror(e, f"switch {link} to {name}") from e
    fsync_dir(envs)
    return envs / name


# --- where the bytes are -------------------------------------------------------------------


def _sources(layout: StateLayout, app_root: Path, manifest: Manifest) -> list[Path]:
    """The directories holding ``manifest``'s files, each file looked up in order.

    Its staging area first, when it is the staged version; then the app root,
    when it is the installed version or when a file is *unchanged* from the
    installed version (same path and digest): the downloader need not stage
    such a file, so a release that keeps its wheels finds them installed.
    Raises EnvError."""
    roots: list[Path] = []
    with contextlib.suppress(UpdaterError):
        if load_staged(layout, manifest.version)[2].sequence == manifest.sequence:
            roots.append(layout.staged_files(manifest.version))
    if _installed(layout) is not None:
        roots.append(app_root)
    if not roots:
        raise EnvError(
            f"environment: the files of {manifest.version} are neither staged nor installed"
        )
    return roots


def _matches(root: Path, entry: FileEntry, algorithm: str) -> bool:
    """Whether ``root/entry.path`` holds exactly the signed bytes."""
    f = open_for_read(root, entry.path)
    if f is None:
        return False
    hasher, size = new_hasher(algorithm), 0
    with f:
        for block in read_chunks(f, f"{root}/{entry.path}"):
            hasher.update(block)
            size += len(block)
    return size == entry.size and hasher.digest() == entry.digest


def _env_entries(manifest: Manifest) -> list[FileEntry]:
    env = manifest.python
    assert env is not None
    prefix = env.wheels.rstrip("/") + "/"
    return [e for e in manifest.files if e.path == env.lock or e.path.startswith(prefix)]


def _verify(roots: Sequence[Path], manifest: Manifest) -> dict[str, Path]:
    """Where each of the lock and the wheels is, checked against its signed digest:
    path -> the root that holds it. Raises EnvError."""
    found: dict[str, Path] = {}
    for entry in _env_entries(manifest):
        root = next((r for r in roots if _matches(r, entry, manifest.hash)), None)
        if root is None:
            where = " or ".join(str(r) for r in roots)
            raise EnvError(f"environment: {entry.path} is missing from {where} "
                           "or does not match the signed manifest")
        found[entry.path] = root
    return found


#: Free space a build needs besides its wheels: a venv's interpreter links,
#: pip's metadata and temp files (a bare venv with pip is ~20 MB).
ENV_BASE_BYTES: Final = 32 * 1024 * 1024
#: Installed packages take up to a few times their (compressed) wheels, and
#: the tool unpacks each wheel to a temp dir first.
ENV_WHEEL_FACTOR: Final = 4


def space_needed(manifest: Manifest) -> int:
    """The free bytes a build of ``manifest``'s env is checked for beforehand."""
    env = manifest.python
    assert env is not None
    wheels = sum(e.size for e in _env_entries(manifest) if e.path != env.lock)
    return ENV_BASE_BYTES + ENV_WHEEL_FACTOR * wheels


def _out_of_space(output: str) -> bool:
    """Whether a tool failed for want of space (pip prints OSError's text,
    uv Rust's ``os error 28``)."""
    text = output.lower()
    return any(s in text for s in ("no space left on device", "errno 28", "os error 28",
                                   "disk quota exceeded", "errno 122", "os error 122"))


# --- building ------------------------------------------------------------------------------


def find_uv() -> str | None:
    """The uv binary: from the ``uv`` package (the ``python`` extra), else on PATH."""
    try:
        import uv  # type: ignore[import-not-found,unused-ignore]

        path = str(uv.find_uv_bin())
        if os.access(path, os.X_OK):
            return path
    except (ImportError, FileNotFoundError, AttributeError):
        pass
    return shutil.which("uv")


def _pip_has_python_option() -> bool:
    """This interpreter's pip can install into another one (``--python``, pip 22.3)."""
    try:
        major, minor, *_ = importlib.metadata.version("pip").split(".")
        return (int(major), int(minor)) >= (22, 3)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


def clean_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """Our environment without pip, uv or Python settings that could add an index,
    a constraint or a path (a device's pip.conf included)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "UV_", "PYTHON")) and k not in ("VIRTUAL_ENV", "CONDA_PREFIX")
    }
    env.update(PIP_CONFIG_FILE=os.devnull, UV_NO_CONFIG="1", PYTHONNOUSERSITE="1")
    env.update(extra)
    return env


def last_error_line(output: str) -> str:
    """The line of a tool's output that says what went wrong: its last ``ERROR``
    or ``error`` line, else its last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.lower().startswith(("error:", "\u00d7")) or "Error:" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _commands(
    settings: BuildSettings, path: Path, wheels: Sequence[str], lock: Path, cache: Path
) -> tuple[str, list[list[str]], dict[str, str]]:
    """The tool's name, the commands that build ``path``, and their environment."""
    tool = settings.tool
    uv = find_uv() if tool in ("auto", "uv") else None
    if tool == "uv" and uv is None:
        raise EnvError("environment: uv is not installed (install fleetpush[python])")
    py = str(path / "bin" / "python")
    links = [arg for w in wheels for arg in ("--find-links", w)]
    install = ["--no-index", "--require-hashes", *links, "-r", str(lock)]
    if uv is not None:
        return "uv", [
            [uv, "venv", "--quiet", "--python", settings.python, str(path)],
            [uv, "pip", "install", "--quiet", "--offline", "--python", py, *install],
        ], clean_env({"UV_CACHE_DIR": str(cache / "uv"), "UV_PYTHON_DOWNLOADS": "never"})
    quiet = ["--disable-pip-version-check", "--no-input", "--no-cache-dir", "--quiet"]
    if _pip_has_python_option():
        # No pip inside the env: seeding it would be most of the build time.
        return "pip", [
            [settings.python, "-m", "venv", "--without-pip", str(path)],
            [sys.executable, "-m", "pip", "--python", py, "install", *quiet, *install],
        ], clean_env()
    return "pip", [
        [settings.python, "-m", "venv", str(path)],
        [py, "-m", "pip", "install", *quiet, *install],
    ], clean_env()


def prepare(
    layout: StateLayout,
    app_root: Path,
    manifest: Manifest,
    settings: BuildSettings | None = None,
) -> Path | None:
    """Build ``manifest``'s env offline at its final path and smoke-check it.

    None if the release carries no env; the env's path otherwise (at once if
    it is already complete). Touches nothing but ``envs/<name>``. Raises
    :class:`EnvError` with the tool's last error line (an incomplete env is
    removed), :class:`DiskFullError` when :func:`space_needed` is not free or
    the tool ran out of space, FilesystemError.
    """
    env = manifest.python
    if env is None:
        return None
    settings = settings or BuildSettings()
    path = env_path(layout, manifest)
    if is_complete(path):
        return path
    found = _verify(_sources(layout, app_root, manifest), manifest)
    remove_tree(path)  # what an interrupted build left
    envs = envs_dir(layout)
    try:
        envs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise wrap_oserror(e, f"create {envs}") from e
    # Before the build, not after pip fills the disk: a full disk is not the
    # release's fault, so it must not end as a failed (bad) release.
    check_free_space(envs, space_needed(manifest), f"environment of {manifest.version}")
    wheels = env.wheels.rstrip("/")
    wheel_dirs = sorted({str(root / wheels) for p, root in found.items() if p != env.lock})
    tool, commands, run_env = _commands(
        settings, path, wheel_dirs, found[env.lock] / env.lock, envs / CACHE_DIR
    )
    started = time.monotonic()
    try:
        for i, argv in enumerate(commands):
            code, out = settings.run(argv, run_env, str(envs), settings.timeout)
            if code != 0:
                if _out_of_space(out):
                    raise DiskFullError(
                        f"environment of {manifest.version}: no space left on device "
                        f"in {envs} ({last_error_line(out)})"
                    )
                raise EnvError(f"environment: {last_error_line(out)}")
            if i == 0:
                crash_point("env-mid-build")
        smoke_check(path, env.imports, settings)
        atomic_write_json(path / COMPLETE, {
            "version": manifest.version,
            "sequence": manifest.sequence,
            "tool": tool,
            "seconds": round(time.monotonic() - started, 3),
        })
        fsync_dir(envs)
    except BaseException:
        with contextlib.suppress(UpdaterError):
            remove_tree(path)
        raise
    crash_point("env-built")
    return path


def smoke_check(path: Path, imports: Sequence[str], settings: BuildSettings) -> None:
    """``python -I -c "import a, b"`` in the env (-I: no cwd, user site or
    PYTHON* variables, so only the env answers). Raises EnvError."""
    if not imports:
        return
    argv = [str(path / "bin" / "python"), "-I", "-c", f"import {', '.join(imports)}"]
    code, out = settings.run(argv, clean_env(), str(path), settings.timeout)
    if code != 0:
        raise EnvError(f"environment: smoke check failed: {last_error_line(out)}")


# --- what the app runs in ------------------------------------------------------------------


def expand_command(command: Sequence[str], venv: Path | None) -> list[str]:
    """``{python}`` and ``{venv}`` in the agent's command: the env's interpreter and
    directory; without an env, the agent's interpreter and ``""``."""
    python = str(venv / "bin" / "python") if venv else sys.executable
    return [
        a.replace("{python}", python).replace("{venv}", str(venv) if venv else "")
        for a in command
    ]


def child_env(base: Mapping[str, str], venv: Path | None) -> dict[str, str]:
    """``base`` with the env's ``bin`` first on PATH and ``VIRTUAL_ENV`` set, as
    ``activate`` does (and ``PYTHONHOME`` dropped, which would defeat the venv)."""
    env = dict(base)
    if venv is None:
        return env
    env.pop("PYTHONHOME", None)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *filter(None, [env.get("PATH")])])
    return env


def reexec_target(
    layout: StateLayout, executable: str, argv: Sequence[str]
) -> tuple[str, list[str]]:
    """What an embedded app re-execs after an apply or rollback (applymode.py,
    hosts.py): its saved command with the placeholders expanded and, when the
    installed release has an env and the saved command is a Python
    interpreter (``python…``), that env's interpreter in its place."""
    venv = current_env(layout)
    out = expand_command(argv, venv)
    if venv is not None and Path(executable).name.startswith("python"):
        python = str(venv / "bin" / "python")
        return python, [python, *out[1:]]
    if argv and argv[0] != out[0]:  # argv[0] was a placeholder
        return out[0], out
    return executable, out


# --- pruning -------------------------------------------------------------------------------


def _wanted(layout: StateLayout) -> tuple[set[str], set[str]]:
    """(env names, versions) to keep: the installed version's env, the env of the
    version each kept backup leads back to, and any env of a staged version."""
    names: set[str] = set()
    installed = _installed(layout)
    if installed is not None and installed.python:
        names.add(env_name(installed))
    for _name, info in list_backups(layout):
        if info.from_version is not None:
            names.add(f"{info.from_version}-{info.from_sequence}")
    try:
        staged = set(os.listdir(layout.updates_dir))
    except FileNotFoundError:
        staged = set()
    except OSError as e:
        raise StateError(f"cannot list {layout.updates_dir}: {e}") from e
    return names, staged


def prune(layout: StateLayout) -> list[str]:
    """Delete envs no longer wanted (see :func:`_wanted`) and stray link temps.

    Run only where no build is under way (the install lock's holders, which
    are the owner's own steps). Returns the names removed.
    """
    envs = envs_dir(layout)
    try:
        names = os.listdir(envs)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StateError(f"cannot list {envs}: {e}") from e
    keep, staged_versions = _wanted(layout)
    removed = []
    for name in names:
        if name in (CURRENT, CACHE_DIR):
            continue
        if name.startswith(_LINK_TEMP):
            with contextlib.suppress(FileNotFoundError):
                (envs / name).unlink()
            continue
        version = name.rpartition("-")[0]
        if name in keep or (version in staged_versions and is_complete(envs / name)):
            continue
        remove_tree(envs / name)
        removed.append(name)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fleetpush.client.pyenv --state DIR --root DIR --version V [--tool T]``:
    build a staged (or the installed) version's env in this process, as the
    agent would; prints its path. Exit 0 built, 1 failed (one line on stderr).
    Used to build inside a network namespace (tests) and by scripts/env_bench.py."""
    import argparse

    parser = argparse.ArgumentParser(prog="fleetpush.client.pyenv")
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--version", required=True)
    parser.add_argument("--tool", choices=["auto", "uv", "pip"], default="auto")
    args = parser.parse_args(argv)
    layout = StateLayout.of(args.state)
    try:
        try:
            manifest = load_staged(layout, args.version)[2]
        except UpdaterError:
            installed = _installed(layout)
            if installed is None or installed.version != args.version:
                raise
            manifest = installed
        path = prepare(layout, args.root, manifest, BuildSettings(tool=args.tool))
    except UpdaterError as e:
        print(f"fleetpush: {args.version}: {e}", file=sys.stderr)
        return 1
    print(path or "")
    return 0


__all__ = [
    "BuildSettings",
    "EnvError",
    "child_env",
    "current_env",
    "env_path",
    "expand_command",
    "prepare",
    "prune",
    "reexec_target",
    "smoke_check",
    "sync_link",
]

if __name__ == "__main__":
    sys.exit(main())
