"""Crash-safe, symlink-safe file primitives for the updater.

Two kinds of files are written here:

* our own bookkeeping (state.json, journal.json, markers) with
  :func:`atomic_write_bytes`: a temp file in the same directory, fsync,
  ``os.replace``, fsync of the directory (STYLE.md §3);
* release files under a root (the app root, a staging or backup tree). Their
  relative path comes from a manifest, so it is re-checked with
  :func:`fleetpush.protocol.paths.check_path` and every directory component
  is opened with ``O_NOFOLLOW`` relative to the previous directory's
  descriptor: a symlink planted anywhere below the root makes the operation
  fail with :class:`UnsafePathError` instead of writing through it
  (specs/THREATS.md, defence in depth). The final component is never followed
  either: files are opened with ``O_NOFOLLOW`` and replaced with
  ``rename(2)``, which replaces a symlink itself rather than its target.

Only the root itself may be a symlink: it comes from configuration, not from
a manifest.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Final

from attrs import frozen
from fleetpush.protocol.errors import BadPath
from fleetpush.protocol.hashing import new_hasher
from fleetpush.protocol.paths import check_path

from .errors import DiskFullError, FilesystemError, UnsafePathError, wrap_oserror

#: Prefix of every temp file this module creates; recovery deletes leftovers.
TEMP_PREFIX: Final = ".fleetpush-tmp-"

#: Release files are installed with at most these permission bits: no setuid,
#: setgid, sticky or group/other write, whatever the manifest says.
MODE_MASK: Final = 0o755

#: Mode of directories created below a root.
DIR_MODE: Final = 0o755

BUFSIZE: Final = 256 * 1024

_O_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_UNSAFE: Final = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EMLINK})


def _temp_name() -> str:
    return f"{TEMP_PREFIX}{secrets.token_hex(6)}"


# --- our own files -------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename or unlink inside it is durable."""
    try:
        fd = os.open(path, _O_DIR)
    except OSError as e:
        raise wrap_oserror(e, f"open directory {path}") from e
    try:
        os.fsync(fd)
    except OSError as e:
        raise wrap_oserror(e, f"fsync directory {path}") from e
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file.

    Raises :class:`DiskFullError` or :class:`FilesystemError`.
    """
    path = Path(path)
    tmp = path.with_name(_temp_name())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise wrap_oserror(e, f"write {path}") from e
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, mode: int = 0o644) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as indented, key-sorted JSON."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n", mode)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file. Raises FileNotFoundError (unwrapped: callers decide),
    ValueError for bad JSON, :class:`FilesystemError` for other OSErrors."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise wrap_oserror(e, f"read {path}") from e
    return json.loads(data)


def check_free_space(path: str | os.PathLike[str], needed: int, what: str) -> None:
    """Raise :class:`DiskFullError` unless ``path``'s filesystem has ``needed`` bytes free."""
    try:
        free = shutil.disk_usage(path).free
    except OSError as e:
        raise wrap_oserror(e, f"disk usage of {path}") from e
    if free < needed:
        raise DiskFullError(f"{what}: {needed} bytes needed on {path}, {free} free")


def same_filesystem(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError as e:
        raise wrap_oserror(e, f"stat {a} / {b}") from e


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a directory tree we own (symlinks inside are removed, not followed)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise wrap_oserror(e, f"remove {path}") from e


# --- files below a root, by relative path ------------------------------------------------


def _split(relpath: str) -> tuple[list[str], str]:
    try:
        check_path(relpath)
    except BadPath as e:
        raise UnsafePathError(str(e)) from e
    *dirs, name = relpath.split("/")
    return dirs, name


def _open_root(root: str | os.PathLike[str]) -> int:
    try:
        return os.open(root, _O_DIR)
    except OSError as e:
        raise wrap_oserror(e, f"open root {root}") from e


def _walk(root: str | os.PathLike[str], dirs: list[str], create: bool) -> int | None:
    """fd of ``root/dirs...``, each component opened with O_NOFOLLOW.

    None if a component is missing and ``create`` is false. Raises
    :class:`UnsafePathError` if a component is a symlink or not a directory.
    """
    fd = _open_root(root)
    try:
        for i, part in enumerate(dirs):
            where = "/".join(dirs[: i + 1])
            made = False
            if create:
                try:
                    os.mkdir(part, DIR_MODE, dir_fd=fd)
                    made = True
                except FileExistsError:
                    pass
            try:
                nfd = os.open(part, _O_DIR | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                os.close(fd)
                return None
            except OSError as e:
                if e.errno in _UNSAFE:
                    raise UnsafePathError(
                        f"{root}/{where} is a symlink or not a directory; refusing to use it"
                    ) from e
                raise
            if made:
                os.fchmod(nfd, DIR_MODE)  # mkdir's mode is filtered by the umask
                os.fsync(fd)
            os.close(fd)
            fd = nfd
    except OSError as e:
        os.close(fd)
        raise wrap_oserror(e, f"open {root}/{'/'.join(dirs)}") from e
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def parent_dir(
    root: str | os.PathLike[str], relpath: str, *, create: bool = False
) -> Iterator[tuple[int | None, str]]:
    """``(fd, name)`` for ``relpath``'s directory (fd None if missing) and file name."""
    dirs, name = _split(relpath)
    fd = _walk(root, dirs, create)
    try:
        yield fd, name
    finally:
        if fd is not None:
            os.close(fd)


def safe_path(root: str | os.PathLike[str], relpath: str) -> Path:
    """``root/relpath`` after checking no component below root is a symlink.

    Missing components are fine (nothing to follow). The final component may
    be missing or a regular file. Raises :class:`UnsafePathError`. Prefer the
    descriptor-based functions below for writing: this check alone is racy.
    """
    with parent_dir(root, relpath) as (fd, name):
        if fd is not None:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise wrap_oserror(e, f"stat {root}/{relpath}") from e
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafePathError(f"{root}/{relpath} exists and is not a regular file")
    return Path(root, *relpath.split("/"))


def _open_file(fd: int, name: str, flags: int, mode: int, where: str) -> int:
    try:
        ffd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    except OSError as e:
        if e.errno in _UNSAFE:
            raise UnsafePathError(f"{where} is a symlink; refusing to open it") from e
        raise
    st = os.fstat(ffd)
    if not stat.S_ISREG(st.st_mode):
        os.close(ffd)
        raise UnsafePathError(f"{where} is not a regular file")
    return ffd


def safe_open_for_write(
    root: str | os.PathLike[str], relpath: str, *, truncate: bool = False, mode: int = 0o644
) -> BinaryIO:
    """Open ``root/relpath`` read-write, creating it and its directories.

    Never follows a symlink below ``root``. The returned file is unbuffered
    binary; seek and write chunks at their offsets, then fsync. Raises
    :class:`UnsafePathError`, :class:`DiskFullError`, :class:`FilesystemError`.
    """
    where = f"{root}/{relpath}"
    with parent_dir(root, relpath, create=True) as (fd, name):
        assert fd is not None
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        try:
            ffd = _open_file(fd, name, flags, mode & MODE_MASK, where)
        except OSError as e:
            raise wrap_oserror(e, f"open {where}") from e
    return os.fdopen(ffd, "r+b", buffering=0)


def open_for_read(root: str | os.PathLike[str], relpath: str) -> BinaryIO | None:
    """Open ``root/relpath`` for reading without following symlinks; None if missing."""
    where = f"{root}/{relpath}"
    with parent_dir(root, relpath) as (fd, name):
        if fd is None:
            return None
        try:
            # O_NONBLOCK: a FIFO planted at a release path must not hang us.
            ffd = _open_file(fd, name, os.O_RDONLY | os.O_NONBLOCK, 0, where)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise wrap_oserror(e, f"open {where}") from e
    return os.fdopen(ffd, "rb", buffering=0)


def read_chunks(f: BinaryIO, what: str) -> Iterator[bytes]:
    try:
        while chunk := f.read(BUFSIZE):
            yield chunk
    except OSError as e:
        raise wrap_oserror(e, f"read {what}") from e


@frozen
class FileInfo:
    size: int
    mode: int
    digest: bytes


def file_info(root: str | os.PathLike[str], relpath: str, algorithm: str) -> FileInfo | None:
    """Size, permission bits and digest of ``root/relpath``; None if it does not exist."""
    f = open_for_read(root, relpath)
    if f is None:
        return None
    with f:
        try:
            st = os.fstat(f.fileno())
        except OSError as e:
            raise wrap_oserror(e, f"stat {root}/{relpath}") from e
        h = new_hasher(algorithm)
        size = 0
        for chunk in read_chunks(f, f"{root}/{relpath}"):
            h.update(chunk)
            size += len(chunk)
    return FileInfo(size, stat.S_IMODE(st.st_mode), h.digest())


def lstat_entry(root: str | os.PathLike[str], relpath: str) -> os.stat_result | None:
    """The entry ``root/relpath`` itself (a symlink is not followed), or None if missing.

    Raises :class:`UnsafePathError` if a directory above it is a symlink,
    FilesystemError.
    """
    with parent_dir(root, relpath) as (fd, name):
        if fd is None:
            return None
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise wrap_oserror(e, f"stat {root}/{relpath}") from e


def entry_kind(root: str | os.PathLike[str], relpath: str) -> str | None:
    """'file', 'dir', 'other' (symlink, device...) or None for a path below root."""
    st = lstat_entry(root, relpath)
    if st is None:
        return None
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    return "other"


def replace_file(
    root: str | os.PathLike[str],
    relpath: str,
    chunks: Iterable[bytes],
    mode: int,
    *,
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Crash-safely put ``chunks`` at ``root/relpath`` with permission bits ``mode``.

    Temp file in the target directory, write, chmod (masked with
    :data:`MODE_MASK`; never chown), fsync, ``rename`` over the target, fsync
    the directory. ``before_replace`` runs after the data is durable and may
    raise to abandon the write (e.g. a digest mismatch). Missing directories
    are created. Raises :class:`UnsafePathError`, :class:`DiskFullError`,
    :class:`FilesystemError` or whatever ``chunks``/``before_replace`` raise;
    on any error the target is untouched and the temp file removed.
    """
    where = f"{root}/{relpath}"
    with parent_dir(root, relpath, create=True) as (fd, name):
        assert fd is not None
        tmp = _temp_name()
        try:
            try:
                tfd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=fd,
                )
                try:
                    for chunk in chunks:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(tfd, view) :]
                    os.fchmod(tfd, mode & MODE_MASK)
                    os.fsync(tfd)
                finally:
                    os.close(tfd)
                if before_replace is not None:
                    before_replace()
                os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
                os.fsync(fd)
            except OSError as e:
                if e.errno in (errno.EISDIR, errno.ENOTEMPTY):
                    raise UnsafePathError(f"{where} is a directory; cannot replace it") from e
                raise wrap_oserror(e, f"install {where}") from e
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=fd)
            raise


def remove_file(root: str | os.PathLike[str], relpath: str) -> bool:
    """Unlink ``root/relpath`` (a symlink is removed, not followed).

    False if nothing was removed: missing, or a directory stands there.
    """
    with parent_dir(root, relpath) as (fd, name):
        if fd is None:
            return False
        try:
            os.unlink(name, dir_fd=fd)
            os.fsync(fd)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno in (errno.EISDIR, errno.EPERM):
                return False  # a directory is not ours to remove here
            raise wrap_oserror(e, f"remove {root}/{relpath}") from e
    return True


def remove_empty_dirs(root: str | os.PathLike[str], reldir: str, *, parents: bool = True) -> None:
    """rmdir ``reldir`` (and, with ``parents``, its parents below ``root``) while empty."""
    parts = reldir.split("/") if reldir else []
    stop = 0 if parents else len(parts) - 1
    while len(parts) > stop:
        with parent_dir(root, "/".join(parts)) as (fd, name):
            if fd is None:
                parts.pop()
                continue
            try:
                os.rmdir(name, dir_fd=fd)
                os.fsync(fd)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    return
                raise wrap_oserror(e, f"remove directory {root}/{reldir}") from e
        parts.pop()


def remove_temp_files(root: str | os.PathLike[str], reldir: str) -> None:
    """Delete leftover :data:`TEMP_PREFIX` files in ``root/reldir`` (after a crash)."""
    dirs = reldir.split("/") if reldir else []
    for d in dirs:
        _split(d)  # each component must itself be a safe name
    fd = _walk(root, dirs, create=False)
    if fd is None:
        return
    try:
        removed = False
        for entry in os.listdir(fd):
            if entry.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=fd)
                removed = True
        if removed:
            os.fsync(fd)
    except OSError as e:
        raise wrap_oserror(e, f"clean {root}/{reldir}") from e
    finally:
        os.close(fd)


__all__ = [
    "BUFSIZE",
    "DIR_MODE",
    "MODE_MASK",
    "TEMP_PREFIX",
    "DiskFullError",
    "FileInfo",
    "FilesystemError",
    "UnsafePathError",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_free_space",
    "entry_kind",
    "file_info",
    "fsync_dir",
    "lstat_entry",
    "open_for_read",
    "parent_dir",
    "read_chunks",
    "read_json",
    "remove_empty_dirs",
    "remove_file",
    "remove_temp_files",
    "remove_tree",
    "replace_file",
    "safe_open_for_write",
    "safe_path",
    "same_filesystem",
]
