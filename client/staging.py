"""Staged updates: ``updates/<version>/`` (layout.py) and the installed manifest.

The downloader (client/download.py) fills ``files/``; :func:`mark_staged`
then writes the ``STAGED`` marker, which binds the exact ``manifest.signed``
bytes by their sha256 so a manifest swapped after staging is refused.

The marker is written only once every staged file was verified: chunk by
chunk as it was downloaded (the downloader; ``mark_staged(verify=False)``)
or whole by :func:`mark_staged` (anything else, e.g. files copied in). Apply
trusts it and checks only each file's kind and size (:func:`check_staged`),
never re-hashing a release (specs/PROTOCOL.md §7.2, issue 14). A staged
directory may lack the files the installed manifest lists unchanged (same
path, digest, size and mode): apply leaves those where they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fleetpush.protocol import codec
from fleetpush.protocol.errors import BadPath, DecodeError, ManifestError
from fleetpush.protocol.manifest import Manifest
from fleetpush.protocol.messages import SignedManifest

from .errors import StagingError, StateError, UpdaterError, wrap_oserror
from .fslink import stat_file
from .fsutil import MODE_MASK, atomic_write_json, file_info, open_for_read, remove_tree
from .layout import StateLayout

StrPath = str | os.PathLike[str]

def decode_signed_manifest(data: bytes, what: str) -> tuple[SignedManifest, Manifest]:
    """Parse a ``manifest.signed`` wire map. Raises :class:`StagingError`.

    Signatures are not checked here: the network side verified them with the
    trust root before staging, and STAGED binds the exact bytes (mark_staged).
    """
    try:
        signed = codec.from_wire(SignedManifest, codec.unpackb(data), "manifest.signed")
        return signed, Manifest.from_bytes(signed.signed)
    except (DecodeError, ManifestError, BadPath) as e:
        raise StagingError(f"{what} is not a valid signed manifest: {e}") from e


def encode_signed_manifest(signed: SignedManifest) -> bytes:
    """The ``manifest.signed`` file: the SignedManifest wire map, msgpack."""
    return codec.packb(codec.to_wire(signed))


def read_signed_manifest(path: StrPath) -> SignedManifest | None:
    """The SignedManifest stored at ``path``; None if the file does not exist.

    Raises :class:`StagingError` (unreadable) or FilesystemError.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise wrap_oserror(e, f"read {path}") from e
    return decode_signed_manifest(data, str(path))[0]


def read_bytes(path: Path, missing: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise StagingError(missing) from e
    except OSError as e:
        raise StagingError(f"cannot read {path}: {e}") from e


def load_staged_manifest(state_dir: StrPath, version: str) -> tuple[SignedManifest, Manifest]:
    """The manifest of ``updates/<version>``, checked against its STAGED marker.

    Raises :class:`StagingError` if the update is not (completely) staged.
    """
    return load_staged(StateLayout.of(state_dir), version)[1:]


def load_staged(layout: StateLayout, version: str) -> tuple[bytes, SignedManifest, Manifest]:
    raw = read_bytes(layout.staged_manifest(version), f"no staged manifest for {version}")
    marker_path = layout.staged_marker(version)
    marker = read_bytes(marker_path, f"{version} is not completely staged (no STAGED marker)")
    try:
        fields = json.loads(marker)
    except ValueError as e:
        raise StagingError(f"{marker_path} is corrupt: {e}") from e
    if not isinstance(fields, dict) or fields.get("manifest_sha256") != hashlib.sha256(
        raw
    ).hexdigest():
        raise StagingError(f"{marker_path} does not match the staged manifest")
    signed, manifest = decode_signed_manifest(raw, str(layout.staged_manifest(version)))
    if manifest.version != version:
        raise StagingError(f"updates/{version} holds the manifest of {manifest.version}")
    return raw, signed, manifest


def unchanged_paths(new: Manifest, old: Manifest | None) -> set[str]:
    """Paths ``old`` (the installed manifest) lists exactly as ``new`` does: same
    digest, size and mode. Install leaves them alone; staging may lack them."""
    if old is None or old.hash != new.hash:
        return set()
    before = {f.path: (f.digest, f.size, f.mode & MODE_MASK) for f in old.files}
    return {f.path for f in new.files if before.get(f.path) == (f.digest, f.size,
                                                                 f.mode & MODE_MASK)}


def verify_staged(
    state_dir: StrPath, version: str, manifest: Manifest, *, may_lack: set[str] | None = None
) -> None:
    """Hash every staged file against the manifest. Raises :class:`StagingError`.

    A path in ``may_lack`` (unchanged from the installed release) may be absent.
    """
    files = StateLayout.of(state_dir).staged_files(version)
    for f in manifest.files:
        try:
            info = file_info(files, f.path, manifest.hash)
        except UpdaterError as e:
            raise StagingError(f"staged {f.path}: {e}") from e
        if info is None:
            if may_lack and f.path in may_lack:
                continue
            raise StagingError(f"staged {version} lacks {f.path}")
        if info.size != f.size or info.digest != f.digest:
            raise StagingError(f"staged {f.path} does not match the manifest")


def check_staged(layout: StateLayout, version: str, manifest: Manifest, paths: list[str]) -> None:
    """Check that each of ``paths`` is staged as a regular file of its signed size.

    What apply checks instead of re-hashing (module docstring): the STAGED
    marker says every file was verified. Raises :class:`StagingError`.
    """
    files = layout.staged_files(version)
    sizes = {f.path: f.size for f in manifest.files}
    for path in paths:
        try:
            found = stat_file(files, path)
        except UpdaterError as e:
            raise StagingError(f"staged {path}: {e}") from e
        if found is None:
            raise StagingError(f"staged {version} lacks {path}")
        if found[0] != sizes[path]:
            raise StagingError(
                f"staged {path} does not match the manifest ({found[0]} bytes, "
                f"signed {sizes[path]}); stage it again"
            )


def mark_staged(state_dir: StrPath, version: str, *, verify: bool = True) -> Manifest:
    """Write ``updates/<version>/STAGED`` atomically: the downloader's last step.

    The marker binds the exact manifest.signed bytes (their sha256) and
    says every file was verified, which apply then trusts (module
    docstring). With ``verify`` every staged file is hashed first (files the
    installed manifest lists unchanged may be absent); pass False only if the
    caller verified and fsynced every file itself, chunk by chunk (the
    downloader). Raises :class:`StagingError` (nothing written) or
    :class:`FilesystemError`.
    """
    layout = StateLayout.of(state_dir)
    raw = read_bytes(layout.staged_manifest(version), f"no staged manifest for {version}")
    _signed, manifest = decode_signed_manifest(raw, str(layout.staged_manifest(version)))
    if manifest.version != version:
        raise StagingError(f"updates/{version} holds the manifest of {manifest.version}")
    if verify:
        installed = load_installed_manifest(state_dir)
        may_lack = unchanged_paths(manifest, installed[1] if installed else None)
        verify_staged(state_dir, version, manifest, may_lack=may_lack)
        # Apply links these very inodes into the app root and does not write
        # them again: their data must be durable now (whoever copied them in
        # may not have fsynced; the downloader does, chunk by chunk).
        _fsync_staged(layout, version, manifest)
    marker = {
        "version": version,
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "verified": "whole" if verify else "chunks",  # how; for whoever investigates
    }
    atomic_write_json(layout.staged_marker(version), marker)
    return manifest


def _fsync_staged(layout: StateLayout, version: str, manifest: Manifest) -> None:
    files = layout.staged_files(version)
    for f in manifest.files:
        src = open_for_read(files, f.path)
        if src is None:
            continue  # an unchanged file not staged (verify_staged allowed it)
        with src:
            try:
                os.fsync(src.fileno())
            except OSError as e:
                raise wrap_oserror(e, f"fsync staged {f.path}") from e


def load_installed_manifest(state_dir: StrPath) -> tuple[SignedManifest, Manifest] | None:
    """The installed version's manifest, None on a fresh device. Raises StateError."""
    path = StateLayout.of(state_dir).installed_manifest
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e}") from e
    try:
        return decode_signed_manifest(raw, str(path))
    except StagingError as e:
        raise StateError(str(e)) from e


def prune_updates(state_dir: StrPath, keep: set[str]) -> None:
    """Delete ``updates/<v>`` for every version not in ``keep``."""
    updates = StateLayout.of(state_dir).updates_dir
    try:
        names = os.listdir(updates)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateError(f"cannot list {updates}: {e}") from e
    for name in names:
        if name not in keep:
            remove_tree(updates / name)
