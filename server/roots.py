"""The roots the releaser serves (specs/PROTOCOL.md §8.5): ``<data_dir>/roots/``.

Operators sign roots offline (``fleetpush root init|sign``) and publish them
with ``fleetpush root publish FILE``, which calls :func:`publish_root` in the
CLI's process, like ``release publish``: the private root keys never reach
the releaser, which only stores the signed files and serves them
(``get_root``) and their newest version (``root_version`` in the hello
result, §5.1).

Publishing applies the device's own rule (protocol/root.py, §8.4): the first
root is version 1 and self-signed at its threshold; each later one is the
next version, signed by the threshold of the previous root's root keys and
its own. So what the releaser serves is always a chain a device can walk,
and a wrong file is refused at the operator's desk, not on the devices.

Files are ``root-<version>.json`` in the root file form (the envelope as JSON,
§8.5), written atomically; a running releaser notices new ones by the
directory's mtime.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.messages import SignedManifest
from fleetpush.protocol.root import (
    Root,
    VerifiedRoot,
    check_current,
    envelope_from_json,
    envelope_to_json,
    load_trusted_root,
    update_root,
)

from .errors import Conflict, PublishError

ROOTS_DIR: Final = "roots"


def _path(data_dir: Path, version: int) -> Path:
    return data_dir / ROOTS_DIR / f"root-{version}.json"


def _versions(roots: Path) -> list[int]:
    out = []
    try:
        names = os.listdir(roots)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith("root-") and name.endswith(".json"):
            with contextlib.suppress(ValueError):
                out.append(int(name[5:-5]))
    return sorted(out)


def read_root_file(path: Path) -> SignedManifest:
    """A root file's envelope. Raises PublishError (unreadable) or RootError (not a root file)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PublishError(f"cannot read {path}: {e.strerror or e}") from e
    return envelope_from_json(data)


class RootStore:
    """The published roots of one data dir, read on demand (trio thread or any thread)."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / ROOTS_DIR
        self._mtime: int | None = None
        self._latest: VerifiedRoot | None = None

    def latest(self) -> VerifiedRoot | None:
        """The newest published root, or None; re-read when the directory changed.

        A file that cannot be read leaves the previous answer (publish_root
        checked it when it was written).
        """
        try:
            mtime = os.stat(self.dir).st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime != self._mtime:
            versions = _versions(self.dir)
            if versions:
                try:
                    env = read_root_file(_path(self.dir.parent, versions[-1]))
                    self._latest = VerifiedRoot(root=Root.from_bytes(env.signed), signed=env)
                except FleetpushError:
                    return self._latest
            self._mtime = mtime
        return self._latest

    def latest_version(self) -> int | None:
        latest = self.latest()
        return None if latest is None else latest.root.version

    def get(self, version: int) -> SignedManifest | None:
        """The envelope of root ``version`` as published, or None."""
        try:
            return read_root_file(_path(self.dir.parent, version))
        except (FleetpushError, OSError):
            return None


@contextlib.contextmanager
def _locked(roots: Path) -> Iterator[None]:
    roots.mkdir(parents=True, exist_ok=True)
    fd = os.open(roots / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def publish_root(data_dir: Path, envelope: SignedManifest, *, now: float) -> tuple[Root, bool]:
    """Store ``envelope`` as the next root of ``data_dir`` (see the module docstring).

    Returns the root and whether it is new: publishing the same bytes again
    is a no-op. Raises :class:`Conflict` (a different root of that version
    exists, or it does not follow the newest),
    :class:`PublishError`, or the trust errors of §8.4 (RootError,
    RootRollback, ExpiredRoot, BadSignature, UnknownKey, ThresholdNotMet).
    """
    data_dir = Path(data_dir)
    roots = data_dir / ROOTS_DIR
    with _locked(roots):
        versions = _versions(roots)
        new = Root.from_bytes(envelope.signed)
        if new.version in versions:
            if read_root_file(_path(data_dir, new.version)).signed != envelope.signed:
                raise Conflict(
                    f"root version {new.version} is already published with other content"
                )
            return new, False
        if not versions:
            if new.version != 1:
                raise Conflict(
                    f"the first root published must be version 1, not {new.version} "
                    "(devices walk every version from the one they were provisioned with)"
                )
            verified = load_trusted_root(envelope)
        else:
            previous = Root.from_bytes(read_root_file(_path(data_dir, versions[-1])).signed)
            verified = update_root(previous, envelope)
        check_current(verified.root, now)
        _write_atomic(_path(data_dir, new.version), envelope_to_json(envelope))
        return verified.root, True


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PublishError(f"cannot write {path}: {e.strerror or e}") from e


__all__ = ["ROOTS_DIR", "RootStore", "publish_root", "read_root_file"]
