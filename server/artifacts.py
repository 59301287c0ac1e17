"""Where release artifacts live: the local data dir or an S3-compatible object store.

Issue 15, part 1 (Artifacts). A release is its files plus an optional zstd
pack (chunk_pack.py); the database row's ``dir`` column says where they are:

- a relative path (``releases/r-<token>``) under the data dir, as before:
  :class:`LocalStore`, byte-for-byte today's layout;
- an ``s3://bucket/prefix/releases/r-<token>`` URL: :class:`S3Store`, any
  S3-API endpoint (MinIO, Ceph RGW, AWS S3, Garage). Endpoint, region and
  credentials come from the standard ``AWS_*`` variables (read by obstore)
  or from :class:`StoreOptions` (``store_endpoint`` in server.toml).

The store is not trusted: the releaser serves what it reads without hashing,
and every device verifies each chunk against the signed manifest
(specs/PROTOCOL.md §7.4, specs/THREATS.md). What a store must do is what the
releaser and the publisher need: put (multipart for big files), ranged get
(a run of consecutive chunks is one ranged GET), list, delete and existence.

obstore's async API is asyncio-only: every call here is its synchronous API,
made in a worker thread (``trio.to_thread.run_sync`` under the chunk cache's
limiter); its own timeouts and bounded retries keep a dead endpoint from
holding a thread for long. Every foreign exception leaves this module as
:class:`ObjectStoreError` (or ``FileNotFoundError`` for a missing object).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import attrs

from .chunk_io import read_into
from .chunk_pack import PackIndex, check_frame, index_from, load_index
from .errors import ObjectStoreError

SCHEME: Final = "s3://"
#: obstore uploads files above this in parts (S3's minimum part is 5 MiB).
MULTIPART_PART: Final = 8 * 1024 * 1024
#: Pack indexes of object-store releases kept in memory.
_INDEXES_KEPT: Final = 64


@attrs.frozen(kw_only=True)
class StoreOptions:
    """How to reach an object store beyond its URL; None: obstore reads ``AWS_*``."""

    endpoint: str | None = None
    region: str | None = None
    #: the whole request, connect included (seconds): a cache miss waits at most this
    #: long per attempt before its chunks are refused.
    timeout: float = 30.0
    connect_timeout: float = 5.0
    #: attempts after the first on a transient failure (obstore backs off between).
    retries: int = 2


class ArtifactStore(Protocol):
    """What the publisher and the releaser need of a place holding release files.

    ``name`` is a ``/``-separated path relative to the store's root.
    """

    def location(self, name: str) -> str:
        """What the database records for ``name`` (the ``dir`` column)."""
        ...

    def put_file(self, name: str, path: Path) -> None: ...

    def read_into(self, name: str, offset: int, buffers: Sequence[bytearray]) -> None: ...

    def get_range(self, name: str, offset: int, length: int) -> bytes: ...

    def list(self, prefix: str) -> list[str]: ...

    def delete(self, names: Sequence[str]) -> None: ...

    def exists(self, name: str) -> bool: ...


def is_remote(location: str) -> bool:
    """True if a release's ``dir`` column names an object store, not the data dir."""
    return location.startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes). Raises ObjectStoreError."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ObjectStoreError(f"{url!r} is not an object store URL [use s3://bucket/prefix]")
    return parts.netloc, parts.path.strip("/")


class LocalStore:
    """Release files under the data dir (the default; today's layout exactly)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)

    def location(self, name: str) -> str:
        return name

    def put_file(self, name: str, path: Path) -> None:
        dest = self.root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)

    def read_into(self, name: str, offset: int, buffers: Sequence[bytearray]) -> None:
        read_into(self.root / name, offset, buffers)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        read_into(self.root / name, offset, [buffer])
        return bytes(buffer)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if base.is_file():
            return [prefix]
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def delete(self, names: Sequence[str]) -> None:
        for name in names:
            (self.root / name).unlink(missing_ok=True)

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()


class S3Store:
    """An S3-compatible bucket (and optional key prefix) through obstore's sync API.

    Raises :class:`ObjectStoreError` from every method (``FileNotFoundError``
    for a missing object from ``read_into``/``get_range``/``size``).
    """

    def __init__(self, url: str, options: StoreOptions | None = None) -> None:
        self.bucket, self.prefix = split_url(url)
        #: ranged GETs made (a figure for benchmarks; updated from worker threads)
        self.gets = 0
        self.url = f"{SCHEME}{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        options = options or StoreOptions()
        try:
            from obstore.store import S3Store as _ObStore
        except ImportError as e:
            raise ObjectStoreError(
                f"{self.url}: the object store client is not installed "
                "[pip install 'fleetpush[s3]']"
            ) from e
        config: dict[str, Any] = {}
        client: dict[str, Any] = {
            "timeout": timedelta(seconds=options.timeout),
            "connect_timeout": timedelta(seconds=options.connect_timeout),
        }
        endpoint = options.endpoint or os.environ.get("AWS_ENDPOINT_URL")
        if options.endpoint:
            config["endpoint"] = options.endpoint
        if options.region:
            config["region"] = options.region
        if endpoint and endpoint.startswith("http://"):
            # Plain HTTP only to an endpoint the operator named so (MinIO on a LAN).
            client["allow_http"] = True
        # obstore's TypedDicts, built as plain dicts: keys depend on the options.
        settings: dict[str, Any] = {
            "config": config,
            "client_options": client,
            "retry_config": {
                "max_retries": options.retries,
                "retry_timeout": timedelta(seconds=options.timeout),
            },
        }
        try:
            self._store = _ObStore(self.bucket, **settings)
        except Exception as e:
            raise ObjectStoreError(f"{self.url}: cannot configure the client: {e}") from e

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def location(self, name: str) -> str:
        return f"{SCHEME}{self.bucket}/{self.key(name)}"

    def _fail(self, what: str, name: str, e: Exception) -> ObjectStoreError:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return ObjectStoreError(f"{what} {self.location(name)}: {why}")

    def put_file(self, name: str, path: Path) -> None:
        import obstore

        try:
            # obstore switches to a multipart upload above chunk_size by itself.
            obstore.put(
                self._store, self.key(name), Path(path), chunk_size=MULTIPART_PART,
                max_concurrency=4,
            )  # fmt: skip
        except Exception as e:
            raise self._fail("cannot upload", name, e) from e

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        import obstore

        if length == 0:
            return b""
        self.gets += 1
        try:
            data = obstore.get_range(self._store, self.key(name), start=offset, length=length)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.location(name)} does not exist") from e
        except Exception as e:
            raise self._fail("cannot read", name, e) from e
        got = bytes(data)
        if len(got) != length:
            raise ObjectStoreError(
                f"{self.location(name)}: {len(got)} bytes at offset {offset}, expected {length}"
            )
        return got

    def read_into(self, name: str, offset: int, buffers: Sequence[bytearray]) -> None:
        """One ranged GET for the whole run of consecutive chunks, split into ``buffers``."""
        total = sum(len(b) for b in buffers)
        data = memoryview(self.get_range(name, offset, total))
        at = 0
        for buffer in buffers:
            buffer[:] = data[at : at + len(buffer)]
            at += len(buffer)

    def size(self, name: str) -> int:
        import obstore

        try:
            return int(obstore.head(self._store, self.key(name))["size"])
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.location(name)} does not exist") from e
        except Exception as e:
            raise self._fail("cannot look up", name, e) from e

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        import obstore

        base = self.key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            return sorted(
                meta["path"][strip:]
                for batch in obstore.list(self._store, base)
                for meta in batch
            )  # fmt: skip
        except Exception as e:
            raise self._fail("cannot list", prefix, e) from e

    def delete(self, names: Sequence[str]) -> None:
        import obstore

        if not names:
            return
        try:
            obstore.delete(self._store, [self.key(n) for n in names])
        except Exception as e:
            raise self._fail("cannot delete", names[0], e) from e


def open_store(
    url: str | None, data_dir: Path, options: StoreOptions | None = None
) -> ArtifactStore:
    """The store ``--store`` names: None or a path means the data dir."""
    if url is None or not url.startswith(SCHEME):
        return LocalStore(data_dir)
    return S3Store(url, options)


# --- the releaser's side ---------------------------------------------------------------


class Artifacts:
    """Resolves a release's ``dir`` column to the store holding it (trio thread).

    One :class:`S3Store` per bucket, made on first use with the releaser's
    options, so a row naming any prefix of a reachable bucket can be served;
    a store that is down fails only the reads of its own releases.
    """

    def __init__(self, data_dir: Path, options: StoreOptions | None = None) -> None:
        self.local = LocalStore(data_dir)
        self.options = options or StoreOptions()
        self._buckets: dict[str, S3Store] = {}
        self._indexes: OrderedDict[str, PackIndex] = OrderedDict()

    @property
    def store_gets(self) -> int:
        """Ranged GETs made to object stores so far."""
        return sum(store.gets for store in self._buckets.values())

    def resolve(self, location: str) -> tuple[ArtifactStore, str]:
        """(store, name) of a release location. Raises ObjectStoreError."""
        if not is_remote(location):
            return self.local, location
        bucket, key = split_url(location)
        store = self._buckets.get(bucket)
        if store is None:
            store = self._buckets[bucket] = S3Store(f"{SCHEME}{bucket}", self.options)
        return store, key

    def pack_index(self, location: str) -> PackIndex:
        """The zstd pack index of a release (runs in a worker thread for remote ones).

        Empty if there is no usable pack; a store failure is not remembered,
        so the next request tries again (chunk reads report the failure).
        """
        if not is_remote(location):
            return load_index(self.local.root / pack_name(location))
        cached = self._indexes.get(location)
        if cached is not None:
            return cached
        store, key = self.resolve(location)
        name = pack_name(key)
        try:
            index = index_from(lambda at, n: store.get_range(name, at, n), _size(store, name))
        except FileNotFoundError:
            index = {}
        except ObjectStoreError:
            return {}
        self._indexes[location] = index
        while len(self._indexes) > _INDEXES_KEPT:
            self._indexes.popitem(last=False)
        return index


#: A release in an object store: the store and the release's name in it.
Remote = tuple[ArtifactStore, str]


def read_remote_frame(  # noqa: PLR0917 - mirrors chunk_pack.read_verified_frame
    store: ArtifactStore,
    name: str,
    where: tuple[int, int],
    length: int,
    algorithm: str,
    expected: bytes,
) -> bytes:
    """The zstd frame at ``where`` in a pack in the store, once shown to expand to the chunk.

    Runs in a worker thread. Raises IntegrityError, ObjectStoreError, FileNotFoundError.
    """
    offset, size = where
    frame = store.get_range(name, offset, size)
    return check_frame(frame, f"{name}: frame at offset {offset}", length, algorithm, expected)


def _size(store: ArtifactStore, name: str) -> int:
    if isinstance(store, S3Store):
        return store.size(name)
    return (Path(getattr(store, "root", ".")) / name).stat().st_size


def pack_name(release: str) -> str:
    """The zstd pack beside a release's files (chunk_pack.pack_path, as a store name)."""
    return release.rstrip("/") + ".zst"


# --- publishing and removing ------------------------------------------------------------


def upload_release(store: ArtifactStore, name: str, staging: Path, pack: Path | None) -> list[str]:
    """Upload a staged release's files (and pack) under ``name``; returns the names written.

    Called before the release's row is written: until then no releaser
    serves anything under ``name`` (a publish that dies midway leaves only
    unreferenced objects, which :func:`remove_release` or a bucket lifecycle
    rule removes). On failure the objects already written are deleted, best
    effort, and the error raised. Raises ObjectStoreError, OSError.
    """
    written: list[str] = []
    try:
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = f"{name}/{path.relative_to(staging).as_posix()}"
            store.put_file(target, path)
            written.append(target)
        if pack is not None:
            store.put_file(pack_name(name), pack)
            written.append(pack_name(name))
    except BaseException:
        with contextlib.suppress(ObjectStoreError, OSError):
            store.delete(written)
        raise
    return written


def remove_release(store: ArtifactStore, name: str) -> list[str]:
    """Delete every object of the release stored under ``name`` (files and pack).

    Returns the names deleted. Raises ObjectStoreError.
    """
    names = [n for n in store.list(name) if n.startswith(name.rstrip("/") + "/")]
    if store.exists(pack_name(name)):
        names.append(pack_name(name))
    store.delete(names)
    return names
