"""Publishing a release: scan a source tree, hash it, build and sign its manifest, store it.

A release is a signed manifest (its exact signed bytes, never re-encoded) plus
its files, copied under ``<data_dir>/releases/<token>/``. Publishing may run in
another process while a server runs on the same data dir (SQLite WAL):

1. the source tree is walked without leaving it: a symlink is followed only if
   it resolves to a regular file inside the source dir; directories that are
   symlinks, and special files (FIFOs, sockets, devices), are refused;
2. files are copied into a staging dir and hashed in the same pass, chunk by
   chunk (never a whole file in memory), then fsynced;
3. the manifest (specs/PROTOCOL.md §7.3) is either built and signed here
   (``signing_keys``) or given ready-signed (``signed=``, made on a machine that
   holds the release key); in that case the copied files must match it exactly;
4. if release keys are known (passed in, or recorded in the data dir by the
   server from its config) the signatures must meet the threshold (§8);
5. the staging dir is renamed into place and the rows are written in one
   transaction; any failure removes the copied files.

The new release is a ``draft``; :mod:`.releases` holds the store that reads it
and moves it along its lifecycle.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import (
    FileEntry,
    FleetpushError,
    Manifest,
    TrustRoot,
    codec,
    sign_manifest,
)
from fleetpush.protocol.manifest import PythonEnv
from fleetpush.protocol.messages import ReleaseInfo, SignedManifest
from fleetpush.protocol.trust import verify_signatures
from fleetpush.protocol.versions import canonical_version

from . import db
from .artifacts import ArtifactStore, upload_release
from .chunk_pack import pack_path, write_pack
from .chunking import Cut, cutter, index_file, signed_cut
from .errors import Conflict, PublishError
from .pyenv_publish import PREFIX, EnvFiles
from .releases import RELEASES_DIR, ReleaseStore
from .roots import RootStore

# --- reading a source tree ----------------------------------------------------------


def scan_tree(source_dir: Path) -> list[tuple[str, Path]]:
    """The regular files under ``source_dir`` as (manifest path, path to open), sorted.

    Raises :class:`PublishError` for special files, directory symlinks and
    symlinks that leave the tree or do not end at a regular file.
    """
    root = Path(source_dir)
    try:
        real_root = root.resolve(strict=True)
        if not real_root.is_dir():
            raise PublishError(f"{root} is not a directory")
    except OSError as e:
        raise PublishError(f"cannot read {root}: {e}") from e
    out: list[tuple[str, Path]] = []

    def fail(e: OSError) -> None:
        raise PublishError(f"cannot read {e.filename}: {e.strerror}")

    for dirpath, dirnames, filenames in os.walk(real_root, onerror=fail, followlinks=False):
        here = Path(dirpath)
        for name in dirnames:
            if (here / name).is_symlink():
                raise PublishError(f"{here / name}: directory symlinks are not published")
        for name in filenames:
            path = here / name
            rel = path.relative_to(real_root).as_posix()
            try:
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = path.resolve(strict=True)
                    if not target.is_relative_to(real_root):
                        raise PublishError(f"{path}: symlink leaves the source directory")
                    st = target.stat()
                    if not stat.S_ISREG(st.st_mode):
                        raise PublishError(f"{path}: symlink to a non-regular file")
                    out.append((rel, target))
                elif stat.S_ISREG(st.st_mode):
                    out.append((rel, path))
                else:
                    raise PublishError(f"{path}: special files cannot be published")
            except OSError as e:
                raise PublishError(f"cannot read {path}: {e}") from e
    out.sort()
    return out


def _entries(
    files: Iterable[tuple[str, Path]],
    cut: Callable[[str], Cut],
    algorithm: str,
    dest: Path | None,
    packed: list[tuple[str, int, bytes]] | None = None,
) -> list[FileEntry]:
    """Each file read once (chunking.py): cut by ``cut(path)``, hashed, copied under ``dest``.

    With ``packed``, chunks that zstd shrinks by 10% are added to it as (path, chunk, frame).
    """
    out = []
    for rel, path in files:
        done = index_file(
            path,
            rel,
            cut(rel),
            algorithm,
            copy_to=None if dest is None else dest / rel,
            compress=packed is not None,
        )
        out.append(done.entry)
        if packed is not None:
            packed.extend((rel, chunk, frame) for chunk, frame in done.compressed)
    return out


def _write_pack(staging: Path, manifest: Manifest, packed: list[tuple[str, int, bytes]]) -> Path:
    """The zstd pack (chunk_pack.py) of a release being published, beside its staging dir."""
    index_of = {f.path: i for i, f in enumerate(manifest.files)}
    path = staging.with_name(staging.name + ".zst")
    write_pack(path, ((index_of[rel], chunk, frame) for rel, chunk, frame in packed))
    return path


def build_manifest(
    source_dir: Path,
    *,
    app: str,
    version: str,
    sequence: int,
    notes: str = "",
    restart: bool = True,
    min_version: str | None = None,
    expires: int | None = None,
    chunk_size: int | None = None,
    hash_algorithm: str = "sha256",
    created: int | None = None,
    env: EnvFiles | None = None,
    schema_version: int | None = None,
    min_schema: int | None = None,
    chunking: str = "fixed",
) -> Manifest:
    """Hash ``source_dir`` into a manifest, to be signed elsewhere and published with ``signed=``.

    ``env``: a Python environment (pyenv_publish.py) whose files join the tree's.
    ``schema_version``/``min_schema``: the data schema the release writes and
    the oldest it migrates from (specs/PROTOCOL.md §7.3.2); None: no claim.
    ``chunking``: "fixed" or "cdc" (§7.3.3; see publish_release).
    Raises :class:`PublishError` (bad tree) or ``ManifestError``/``BadPath``.
    """
    cut, chunk_size = cutter(chunking, chunk_size)
    files = _entries(_with_env(scan_tree(source_dir), env), cut, hash_algorithm, None)
    return _manifest(
        files,
        app,
        version,
        sequence,
        notes,
        restart,
        min_version,
        expires,
        chunk_size,
        hash_algorithm,
        created,
        env.python if env else None,
        schema_version=schema_version,
        min_schema=min_schema,
    )


def _with_env(tree: list[tuple[str, Path]], env: EnvFiles | None) -> list[tuple[str, Path]]:
    """The tree's files plus the env's, which own the reserved prefix."""
    if env is None:
        return tree
    for rel, _path in tree:
        if rel == PREFIX or rel.startswith(PREFIX + "/"):
            raise PublishError(
                f"{rel}: {PREFIX}/ is reserved for the environment --requirements/--wheelhouse "
                "makes; remove it from the release directory"
            )
    return sorted([*tree, *env.files])


def _manifest(  # noqa: PLR0917 - private; mirrors build_manifest's keywords
    files: list[FileEntry],
    app: str,
    version: str,
    sequence: int,
    notes: str,
    restart: bool,
    min_version: str | None,
    expires: int | None,
    chunk_size: int,
    hash_algorithm: str,
    created: int | None,
    python: PythonEnv | None = None,
    *,
    schema_version: int | None = None,
    min_schema: int | None = None,
) -> Manifest:
    manifest = Manifest(
        app=app,
        version=canonical_version(version),
        sequence=sequence,
        created=int(time.time()) if created is None else created,
        expires=expires,
        min_version=None if min_version is None else canonical_version(min_version),
        restart=restart,
        notes=notes,
        hash=hash_algorithm,
        chunk_size=chunk_size,
        files=files,
        python=python,
        schema_version=schema_version,
        min_schema=min_schema,
    )
    manifest.to_bytes()  # validates every rule of §7.3
    return manifest


def _release_keys(conn: db.Connection, data_dir: Path) -> tuple[list[bytes], int]:
    # Once roots are published, the newest root's release role is what devices
    # check (specs/PROTOCOL.md §8.5): a release it would refuse is refused here.
    latest = RootStore(data_dir).latest()
    if latest is not None:
        trust = latest.root.trust("release")
        return list(trust.keys.values()), trust.threshold
    raw = db.get_meta(conn, "release_keys")
    keys = [bytes.fromhex(k) for k in db.loads(raw)] if raw else []
    return keys, int(db.get_meta(conn, "release_threshold") or 1)


def _reset(data_dir: Path, app: str) -> int | None:
    """The sequence the newest published root lowers ``app`` to (§8.5), or None."""
    latest = RootStore(data_dir).latest()
    return None if latest is None else latest.root.sequence_resets.get(app)


def record_release_keys(conn: db.Connection, keys: Sequence[bytes], threshold: int) -> None:
    """Remember the server's release keys so publishers in other processes check them too."""
    with db.transaction(conn):
        db.set_meta(conn, "release_keys", db.dumps([k.hex() for k in keys]))
        db.set_meta(conn, "release_threshold", str(threshold))


def publish_release(
    data_dir: Path,
    source_dir: Path,
    *,
    app: str | None = None,
    version: str | None = None,
    sequence: int | None = None,
    notes: str = "",
    restart: bool = True,
    min_version: str | None = None,
    expires: int | None = None,
    chunk_size: int | None = None,
    hash_algorithm: str = "sha256",
    signing_keys: Sequence[Ed25519PrivateKey] = (),
    signed: SignedManifest | None = None,
    release_keys: Sequence[bytes] | None = None,
    release_threshold: int | None = None,
    operator: str = "publish",
    env: EnvFiles | None = None,
    schema_version: int | None = None,
    min_schema: int | None = None,
    chunking: str = "fixed",
    compress: bool = False,
    store: ArtifactStore | None = None,
) -> ReleaseInfo:
    """Publish ``source_dir`` as a new ``draft`` release of ``app`` (see module docstring).

    Either sign here with ``signing_keys`` (``app`` and ``version`` required;
    ``sequence`` defaults to the app's highest plus one) or pass ``signed``, a
    manifest built by :func:`build_manifest` and signed elsewhere (``app``,
    ``version`` and ``sequence``, if given, must match it). ``schema_version``
    and ``min_schema`` are the release's data schema claims (§7.3.2).

    Raises :class:`PublishError` (bad tree, files differ from the manifest,
    signatures refused), :class:`Conflict` (version or sequence taken, sequence
    not above the app's highest), ``ManifestError``/``BadPath``/``VersionError``.

    ``env`` (pyenv_publish.resolve_env): a Python environment whose wheels and
    lock join the tree's files and set the manifest's ``python`` (§7.3.1).

    ``chunking`` (§7.3.3): "fixed" cuts ``chunk_size`` chunks (1 MiB by
    default) that every device reads; "cdc" cuts content-defined chunks of at
    most ``chunk_size`` (256 KiB by default), which only devices announcing
    "chunks-v" (protocol 1.1) may fetch. "fixed" stays this function's
    default so existing callers keep their manifests; ``fleetpush release
    publish`` defaults to "cdc". ``compress``: keep zstd frames of the chunks
    it shrinks by 10% or more, sent as DATA_ZSTD to devices announcing "zstd"
    (chunk_pack.py, §2.3.1).

    ``store``: an object store (artifacts.S3Store, ``--store s3://...``) to
    upload the files and pack to instead of moving them into the data dir;
    they are still staged and hashed locally first, so what is uploaded is
    what was hashed. The row is written only after the last upload, so a
    publish interrupted midway leaves nothing a releaser serves (only
    unreferenced objects, deleted on failure where the process survives).
    Raises ObjectStoreError too.
    """
    data_dir = Path(data_dir)
    conn = db.open_database(data_dir)
    releases = data_dir / RELEASES_DIR
    staging = releases / f".staging-{secrets.token_hex(8)}"
    final: Path | None = None
    lock: int | None = None
    packed: list[tuple[str, int, bytes]] | None = [] if compress else None
    pack: Path | None = None
    uploaded: list[str] = []
    try:
        lock = _lock_staging(staging)
        if release_keys is None:
            keys, threshold = _release_keys(conn, data_dir)
        else:
            keys, threshold = list(release_keys), release_threshold or 1
        trust = TrustRoot.from_public_keys(keys, threshold) if keys else None
        if signed is None:
            if app is None or version is None:
                raise PublishError("publishing needs app and version (or a signed manifest)")
            seq = (
                sequence
                if sequence is not None
                else ReleaseStore(conn, data_dir).highest_sequence(app, _reset(data_dir, app)) + 1
            )
            tree = _with_env(scan_tree(source_dir), env)
            cut, size = cutter(chunking, chunk_size)
            files = _entries(tree, cut, hash_algorithm, staging, packed)
            manifest = _manifest(
                files,
                app,
                version,
                seq,
                notes,
                restart,
                min_version,
                expires,
                size,
                hash_algorithm,
                None,
                env.python if env else None,
                schema_version=schema_version,
                min_schema=min_schema,
            )
            signed = sign_manifest(manifest.to_bytes(), signing_keys)
            if trust is not None:
                _verify(trust, signed)
        else:
            if trust is not None:
                _verify(trust, signed)  # before copying gigabytes for nothing
            manifest = Manifest.from_bytes(signed.signed)
            for name, want, have in (
                ("app", app, manifest.app),
                (
                    "version",
                    None if version is None else canonical_version(version),
                    manifest.version,
                ),
                ("sequence", sequence, manifest.sequence),
                ("schema_version", schema_version, manifest.schema_version),
                ("min_schema", min_schema, manifest.min_schema),
            ):
                if want is not None and want != have:
                    raise PublishError(
                        f"{name} {want!r} does not match the signed manifest's {have!r}"
                    )
            tree = _with_env(scan_tree(source_dir), env)
            files = _entries(tree, signed_cut(manifest), manifest.hash, staging, packed)
            _match(manifest, files)
        if packed:
            pack = _write_pack(staging, manifest, packed)
        if store is not None:
            name = f"{RELEASES_DIR}/r-{secrets.token_hex(8)}"
            uploaded = upload_release(store, name, staging, pack)
            _insert(conn, manifest, signed, store.location(name), operator,
                    reset=_reset(data_dir, manifest.app))  # fmt: skip
            uploaded = []
            return ReleaseStore(conn, data_dir).get(manifest.app, manifest.version).info()
        final = releases / f"r-{secrets.token_hex(8)}"
        if pack is not None:
            # Before the files: a release whose pack is missing serves plain DATA.
            os.replace(pack, pack_path(final))
            pack = pack_path(final)
        os.replace(staging, final)
        _fsync_dir(releases)
        reset = _reset(data_dir, manifest.app)
        _insert(
            conn, manifest, signed, final.relative_to(data_dir).as_posix(), operator, reset=reset
        )
        return ReleaseStore(conn, data_dir).get(manifest.app, manifest.version).info()
    except BaseException:
        if uploaded and store is not None:
            # The row was not written: these objects are nobody's.
            with contextlib.suppress(FleetpushError, OSError):
                store.delete(uploaded)
        shutil.rmtree(staging, ignore_errors=True)
        if final is not None:
            shutil.rmtree(final, ignore_errors=True)
        if pack is not None:
            pack.unlink(missing_ok=True)
        raise
    finally:
        conn.close()
        if store is not None:
            # Uploaded (or failed): the local staging copy is not the release.
            shutil.rmtree(staging, ignore_errors=True)
            if pack is not None:
                pack.unlink(missing_ok=True)
        if lock is not None:
            # Unlinked while still held: a cleaner that takes the lock after this
            # finds no staging dir left to remove (see remove_stale_staging).
            with contextlib.suppress(OSError):
                _lock_path(staging).unlink()
            os.close(lock)


# --- staging dirs of publishers that died -----------------------------------------------
#
# A publish holds an exclusive flock on ``.staging-X.lock`` (next to its staging
# dir ``.staging-X``, never inside it: every file in the staging dir becomes
# part of the release) from before the dir exists until it is renamed into
# place or removed. The kernel drops the lock when the publisher dies, however
# it dies, so the releaser can remove a staging dir as soon as its lock can be
# taken, while serving, without ever racing a live publish (issue 10, item 13).
# flock needs a local filesystem (or one that implements it, e.g. NFSv4).

#: Staging dirs without a lock file (left by a fleetpush before the lock
#: existed) are removed only once this old.
UNLOCKED_STAGING_AGE: Final = 3600.0


#: A lock file with no staging dir is removed once this old (seconds).
ORPHAN_LOCK_AGE: Final = 60.0


def _lock_path(staging: Path) -> Path:
    return staging.with_name(staging.name + ".lock")


def _lock_staging(staging: Path) -> int:
    """Create and lock ``staging``'s lock file, then the dir; returns the lock's fd.

    Raises OSError.
    """
    staging.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_lock_path(staging), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        staging.mkdir()
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            _lock_path(staging).unlink()
        raise
    return fd


def remove_stale_staging(
    data_dir: Path, older_than: float = UNLOCKED_STAGING_AGE
) -> list[Path]:
    """Delete the staging dirs of publishers that are gone; returns them.

    A staging dir whose lock file can be locked has no live publisher and
    goes at once; one whose lock is held is left alone; one with no lock file
    at all goes once older than ``older_than`` seconds. Never raises: a dir
    that cannot be removed now is tried again on the next call.
    """
    removed = []
    cutoff = time.time() - older_than
    releases = Path(data_dir) / RELEASES_DIR
    for path in releases.glob(".staging-*"):
        if path.name.endswith(".lock"):
            continue
        with contextlib.suppress(OSError):
            if _publisher_gone(path, cutoff):
                # .staging-X.zst is a file: the zstd pack of a publish that died.
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
    for lock in releases.glob(".staging-*.lock"):
        # A lock file whose dir is gone: its publisher died between the two, or
        # after its rename but before the unlink. A publisher creates its lock
        # file, then locks it: a young one may be in between, so leave it.
        staging = lock.with_name(lock.name[: -len(".lock")])
        with contextlib.suppress(OSError):
            if not staging.exists() and lock.stat().st_mtime < time.time() - ORPHAN_LOCK_AGE:
                _publisher_gone(staging, cutoff)
    return removed


def _publisher_gone(staging: Path, cutoff: float) -> bool:
    """True if no publisher holds ``staging`` (its lock file is then removed). Raises OSError."""
    try:
        fd = os.open(_lock_path(staging), os.O_RDWR)
    except FileNotFoundError:
        return staging.stat().st_mtime < cutoff
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        # Ours now, and no publisher takes a lock file it did not create.
        _lock_path(staging).unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def _verify(trust: TrustRoot, signed: SignedManifest) -> None:
    try:
        verify_signatures(trust, signed)
    except FleetpushError as e:
        raise PublishError(f"the manifest's signatures are refused: {e}") from e


def _match(manifest: Manifest, files: list[FileEntry]) -> None:
    have = {f.path: f for f in files}
    want = {f.path: f for f in manifest.files}
    if set(have) != set(want):
        extra = sorted(set(have) - set(want))
        missing = sorted(set(want) - set(have))
        raise PublishError(
            f"source files differ from the manifest: extra {extra}, missing {missing}"
        )
    for path, entry in want.items():
        got = have[path]
        if (got.size, got.digest, got.chunks) != (entry.size, entry.digest, entry.chunks):
            raise PublishError(f"{path}: content differs from the signed manifest")


def _insert(
    conn: db.Connection,
    manifest: Manifest,
    signed: SignedManifest,
    rel_dir: str,
    operator: str,
    *,
    reset: int | None = None,
) -> None:
    sigs = codec.packb([{"keyid": s.keyid, "sig": s.sig} for s in signed.signatures])
    now = time.time()
    with db.transaction(conn):
        highest = ReleaseStore(conn, Path()).highest_sequence(manifest.app, reset)
        exists = conn.execute(
            "SELECT 1 FROM releases WHERE app = ? AND version = ?", (manifest.app, manifest.version)
        ).fetchone()
        if exists:
            raise Conflict(f"{manifest.app} {manifest.version} is already published")
        if manifest.sequence <= highest:
            raise Conflict(
                f"sequence {manifest.sequence} is not above {manifest.app}'s highest ({highest})"
            )
        conn.execute(
            "INSERT INTO releases (app, version, sequence, status, created, notes, size, files,"
            " restart, min_version, expires, manifest, signatures, dir)"
            " VALUES (?, ?, ?, 'draft', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                manifest.app,
                manifest.version,
                manifest.sequence,
                now,
                manifest.notes,
                manifest.total_size,
                len(manifest.files),
                int(manifest.restart),
                manifest.min_version,
                manifest.expires,
                signed.signed,
                sigs,
                rel_dir,
            ),
        )
        conn.execute(
            "INSERT INTO release_history (app, version, old_status, new_status, time, operator)"
            " VALUES (?, ?, NULL, 'draft', ?, ?)",
            (manifest.app, manifest.version, now, operator),
        )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
