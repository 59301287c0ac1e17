"""Moving release files by hard link instead of copying them (issue 14).

An apply installs a staged file by linking it to a temp name in the target
directory and renaming that over the target (:func:`link_file`), and backs
up an old file the same way; only the directory fsyncs remain, batched per
directory (:func:`fsync_dirs`). Paths below a root get fsutil's protection:
every directory component is opened with ``O_NOFOLLOW``
(:func:`fsutil.parent_dir`), the source is opened ``O_NOFOLLOW`` and must be
a regular file, and the link itself never follows a symlink. Where the two
roots cannot share an inode, :func:`link_file` says so and the caller copies.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from typing import Final

from .errors import FilesystemError, UnsafePathError, wrap_oserror
from .fsutil import MODE_MASK, TEMP_PREFIX, lstat_entry, parent_dir

#: errno values of a ``link(2)`` that cannot work here (another filesystem, or
#: one without hard links): the caller copies instead.
_NO_LINK: Final = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP})


def stat_file(root: str | os.PathLike[str], relpath: str) -> tuple[int, int] | None:
    """``(size, permission bits)`` of the regular file ``root/relpath``, not hashed.

    None if it is missing. Raises :class:`UnsafePathError` if it (or a directory
    above it) is a symlink or not a regular file.
    """
    st = lstat_entry(root, relpath)
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{root}/{relpath} is not a regular file")
    return st.st_size, stat.S_IMODE(st.st_mode)


def link_file(
    src_root: str | os.PathLike[str],
    relpath: str,
    dst_root: str | os.PathLike[str],
    mode: int | None,
    *,
    size: int | None = None,
    before_replace: Callable[[], None] | None = None,
    sync_dir: bool = True,
) -> bool:
    """Put ``src_root/relpath`` at ``dst_root/relpath`` by hard link: no copy, no re-hash.

    Link to a temp name in the target directory, then ``rename`` over the
    target: a crash leaves the old or the new file, and maybe a temp file
    (:func:`remove_temp_files`). ``mode`` (masked) is set on the shared inode
    and fsynced; the data must be durable already (staged files are fsynced
    by the downloader). ``size``, if given, is checked. ``sync_dir=False``
    leaves the directory fsync to the caller (:func:`fsync_dirs`, once per
    directory). No symlink is followed at either end.

    Returns False, with nothing changed, if the roots cannot share an inode
    (another filesystem, no hard links): the caller copies instead. Raises
    :class:`UnsafePathError`, :class:`FilesystemError` (also for a missing
    source) or what ``before_replace`` raises; the target is then untouched.
    """
    where = f"{dst_root}/{relpath}"
    with parent_dir(src_root, relpath) as (sfd, name):
        if sfd is None:
            raise FilesystemError(f"{src_root}/{relpath} is missing")
        try:
            ffd = _open_regular(sfd, name, f"{src_root}/{relpath}")
        except OSError as e:
            raise wrap_oserror(e, f"open {src_root}/{relpath}") from e
        try:
            with parent_dir(dst_root, relpath, create=True) as (dfd, dname):
                assert dfd is not None
                st = os.fstat(ffd)
                if os.fstat(dfd).st_dev != st.st_dev:
                    return False  # before the chmod: nothing changed
                if size is not None and st.st_size != size:
                    raise FilesystemError(f"{src_root}/{relpath}: {st.st_size} bytes, not {size}")
                if mode is not None and stat.S_IMODE(st.st_mode) != mode & MODE_MASK:
                    os.fchmod(ffd, mode & MODE_MASK)
                    os.fsync(ffd)  # the inode change only: the data is durable already
                return _link_over(
                    (sfd, name), (dfd, dname), st, where=where,
                    before_replace=before_replace, sync_dir=sync_dir,
                )
        except OSError as e:
            raise wrap_oserror(e, f"install {where}") from e
        finally:
            os.close(ffd)


def _link_over(
    src: tuple[int, str], dst: tuple[int, str], st: os.stat_result, *, where: str,
    before_replace: Callable[[], None] | None, sync_dir: bool,
) -> bool:
    """Link ``src`` (dir fd, name; ``st`` its stat) to a temp name, rename it over ``dst``."""
    (sfd, name), (dfd, dname) = src, dst
    tmp = f"{TEMP_PREFIX}{secrets.token_hex(6)}"
    try:
        os.link(name, tmp, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
    except OSError as e:
        if e.errno in _NO_LINK:
            return False
        raise wrap_oserror(e, f"link {where}") from e
    try:
        if (st.st_dev, st.st_ino) != _ids(tmp, dfd):
            raise UnsafePathError(f"{where}: the source changed while being linked")
        if before_replace is not None:
            before_replace()
        if _ids(dname, dfd) == (st.st_dev, st.st_ino):
            # rename(2) between two links of one inode does nothing and
            # would leave the temp name: the target is the file already.
            os.unlink(tmp, dir_fd=dfd)
            return True
        os.rename(tmp, dname, src_dir_fd=dfd, dst_dir_fd=dfd)
        if sync_dir:
            os.fsync(dfd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        if e.errno in (errno.EISDIR, errno.ENOTEMPTY):
            raise UnsafePathError(f"{where} is a directory; cannot replace it") from e
        raise wrap_oserror(e, f"install {where}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    return True


def _ids(name: str, dir_fd: int) -> tuple[int, int] | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def fsync_dirs(root: str | os.PathLike[str], reldirs: Iterable[str]) -> None:
    """fsync each ``root/<reldir>`` ("" is root), never following a symlink: one fsync
    per directory after a batch of :func:`link_file` renames into it."""
    for reldir in sorted(set(reldirs)):
        # parent_dir of a name inside reldir opens reldir itself, component by
        # component with O_NOFOLLOW; the name is never used.
        with parent_dir(root, f"{reldir}/x" if reldir else "x") as (fd, _name):
            if fd is None:
                continue
            try:
                os.fsync(fd)
            except OSError as e:
                raise wrap_oserror(e, f"fsync directory {root}/{reldir}") from e


def _open_regular(dir_fd: int, name: str, where: str) -> int:
    """fd of the regular file ``name`` (O_NOFOLLOW, O_NONBLOCK: a FIFO never hangs us)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"{where} is a symlink; refusing to open it") from e
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f"{where} is not a regular file")
    return fd


__all__ = ["fsync_dirs", "link_file", "stat_file"]
