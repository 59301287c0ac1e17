"""Release manifests: format, canonical encoding, signing (specs/PROTOCOL.md §7).

The manifest is a msgpack map encoded canonically (sorted keys, shortest
integer forms, bin for bytes). It travels as a :class:`SignedManifest`: the
exact ``signed`` bytes plus Ed25519 signatures over ``DOMAIN || signed``.
Receivers verify over the bytes they received and only then decode them; they
never re-encode to verify (§8.3). Unknown top-level keys are kept in
``extra`` so newer manifests still load (§7.5).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, Final

from attrs import field, frozen
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import codec, keys
from .errors import DecodeError, ManifestError
from .hashing import DIGEST_SIZE
from .limits import MAX_ARRAY_LEN, MAX_CHUNK_SIZE, MAX_FILES, MIN_CHUNK_SIZE
from .messages import Signature, SignedManifest
from .paths import check_paths
from .versions import canonical_version

FORMAT: Final = 1
#: The largest schema_version / min_schema (§7.3.2).
MAX_SCHEMA: Final = 1_000_000
DOMAIN: Final = b"fleetpush-manifest-v1\x00"
HASH_ALGORITHMS: Final = ("sha256", "blake3")


#: Optional manifest fields added after format 1 was fixed: absent when unset.
_OPTIONAL = {codec.OMIT_NONE: True}


@frozen(kw_only=True)
class FileEntry:
    path: str
    size: int
    mode: int
    digest: bytes
    chunks: list[bytes]
    #: §7.3.3: the length of each chunk of a content-defined (variable) file;
    #: None: fixed chunks of the manifest's ``chunk_size``, as in protocol 1.0.
    sizes: list[int] | None = field(default=None, metadata=_OPTIONAL)
    #: prefix sums of ``sizes`` (chunk start offsets), worked out on first use;
    #: init=False keeps it off the wire (codec.to_wire) and out of equality.
    _starts: list[int] | None = field(default=None, init=False, eq=False, repr=False)

    def chunk_count(self, chunk_size: int) -> int:
        if self.sizes is not None:
            return len(self.chunks)
        return -(-self.size // chunk_size)

    def chunk_length(self, chunk_size: int, index: int) -> int:
        if self.sizes is None:
            return min(chunk_size, self.size - index * chunk_size)
        return self.chunk_span(chunk_size, index)[1]

    def chunk_span(self, chunk_size: int, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index`` in the file, for both kinds (§7.3.3).

        Raises IndexError for an index outside the file's chunks.
        """
        if self.sizes is None:
            if not 0 <= index < self.chunk_count(chunk_size):
                raise IndexError(f"{self.path}: no chunk {index}")
            offset = index * chunk_size
            return offset, min(chunk_size, self.size - offset)
        if not 0 <= index < len(self.sizes):
            raise IndexError(f"{self.path}: no chunk {index}")
        starts = self._starts
        if starts is None:
            starts = list(itertools.accumulate(self.sizes, initial=0))
            # A frozen class caches through object.__setattr__: the cache is
            # derived from ``sizes`` alone, so it never changes the value.
            object.__setattr__(self, "_starts", starts)
        return starts[index], self.sizes[index]


@frozen(kw_only=True)
class PythonEnv:
    """A Python environment the release carries (§7.3.1): wheels plus a lock.

    Both paths name files of the release itself, so the manifest's digests
    cover every wheel and the lock; the device builds the env offline.
    """

    #: the hash-pinned requirements file (pip ``--require-hashes`` format).
    lock: str
    #: the directory (a path prefix in ``files``) holding every wheel the lock names.
    wheels: str
    #: modules imported in the new env as its smoke check.
    imports: list[str] = field(factory=list)
    #: the interpreter the wheels were resolved for, e.g. ``"3.11"`` (informational).
    python: str = ""


@frozen(kw_only=True)
class Manifest:
    format: int = FORMAT
    app: str
    version: str
    sequence: int
    created: int
    expires: int | None = None
    min_version: str | None = None
    restart: bool = True
    notes: str = ""
    hash: str = "sha256"
    chunk_size: int
    files: list[FileEntry]
    #: §7.3.1; None: the release ships no Python environment.
    python: PythonEnv | None = field(default=None, metadata=_OPTIONAL)
    #: §7.3.2: the data schema this release's code writes, and the oldest it migrates from.
    schema_version: int | None = field(default=None, metadata=_OPTIONAL)
    min_schema: int | None = field(default=None, metadata=_OPTIONAL)
    extra: dict[str, Any] = field(factory=dict)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def variable_chunks(self) -> bool:
        """Whether any file is cut into content-defined chunks (§7.3.3)."""
        return any(f.sizes is not None for f in self.files)

    @property
    def total_chunks(self) -> int:
        return sum(f.chunk_count(self.chunk_size) for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        for f in self.files:
            if f.path == path:
                return f
        return None

    def to_bytes(self) -> bytes:
        """The canonical encoding: the bytes that get signed."""
        validate(self)
        return codec.packb(codec.to_wire(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Decode and validate. Raises :class:`ManifestError` or :class:`BadPath`."""
        try:
            raw = codec.unpackb(data)
            manifest = codec.from_wire(cls, raw, "manifest")
        except DecodeError as e:
            raise ManifestError(f"malformed manifest: {e}") from e
        validate(manifest)
        return manifest


def validate(m: Manifest) -> None:
    """Check every structural rule of §7.3. Raises ManifestError or BadPath."""
    if m.format != FORMAT:
        raise ManifestError(
            f"manifest format {m.format} is not supported (this side reads {FORMAT})"
        )
    if not m.app or len(m.app) > 128:
        raise ManifestError("app name must be 1-128 characters")
    if canonical_version(m.version) != m.version:
        raise ManifestError(f"version {m.version!r} is not in canonical form")
    if m.min_version is not None and canonical_version(m.min_version) != m.min_version:
        raise ManifestError(f"min_version {m.min_version!r} is not in canonical form")
    if m.sequence < 1:
        raise ManifestError("sequence must be >= 1")
    if m.hash not in HASH_ALGORITHMS:
        raise ManifestError(f"unknown hash algorithm {m.hash!r}")
    if not MIN_CHUNK_SIZE <= m.chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestError(
            f"chunk_size {m.chunk_size} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
        )
    if len(m.files) > MAX_FILES:
        raise ManifestError(f"more than {MAX_FILES} files")
    check_paths([f.path for f in m.files])
    _validate_schema(m)
    if m.python is not None:
        _validate_python(m, m.python)
    for f in m.files:
        if f.size < 0:
            raise ManifestError(f"{f.path}: negative size")
        if not 0 <= f.mode <= 0o7777:
            raise ManifestError(f"{f.path}: mode {f.mode:#o} out of range")
        if len(f.digest) != DIGEST_SIZE:
            raise ManifestError(f"{f.path}: digest must be {DIGEST_SIZE} bytes")
        if len(f.chunks) > MAX_ARRAY_LEN:
            # No receiver would decode it (§10): ~6 GiB of 64 KiB content-defined
            # chunks, ~100 GiB of 1 MiB fixed ones.
            raise ManifestError(
                f"{f.path}: {len(f.chunks)} chunks, more than the {MAX_ARRAY_LEN} a manifest "
                "may list for one file; publish it with larger chunks"
            )
        if f.sizes is not None:
            _validate_sizes(f, m.chunk_size)
        elif len(f.chunks) != f.chunk_count(m.chunk_size):
            raise ManifestError(
                f"{f.path}: {len(f.chunks)} chunk digests for {f.chunk_count(m.chunk_size)} chunks"
            )
        if any(len(c) != DIGEST_SIZE for c in f.chunks):
            raise ManifestError(f"{f.path}: chunk digests must be {DIGEST_SIZE} bytes")


def _validate_sizes(f: FileEntry, chunk_size: int) -> None:
    """§7.3.3: a variable file's sizes cover it exactly, each within 1..chunk_size.

    These bounds are what let a device size its receive buffers and file
    offsets from the signed manifest alone (specs/THREATS.md, "sizes that lie").
    """
    sizes = f.sizes
    assert sizes is not None
    if len(sizes) != len(f.chunks):
        raise ManifestError(f"{f.path}: {len(f.chunks)} chunk digests for {len(sizes)} sizes")
    if any(type(n) is not int or not 1 <= n <= chunk_size for n in sizes):
        raise ManifestError(f"{f.path}: every chunk size must be in [1, {chunk_size}]")
    if sum(sizes) != f.size:
        raise ManifestError(f"{f.path}: chunk sizes add up to {sum(sizes)}, not its size {f.size}")


def _validate_schema(m: Manifest) -> None:
    for name in ("schema_version", "min_schema"):
        value = getattr(m, name)
        if value is not None and not 0 <= value <= MAX_SCHEMA:
            raise ManifestError(f"{name} {value} outside [0, {MAX_SCHEMA}]")
    if m.min_schema is not None:
        if m.schema_version is None:
            raise ManifestError("min_schema needs schema_version")
        if m.min_schema > m.schema_version:
            raise ManifestError(
                f"min_schema {m.min_schema} is above schema_version {m.schema_version}"
            )


def _validate_python(m: Manifest, env: PythonEnv) -> None:
    paths = {f.path for f in m.files}
    if env.lock not in paths:
        raise ManifestError(f"python.lock {env.lock!r} is not a file of the release")
    prefix = env.wheels.rstrip("/") + "/"
    if not env.wheels or not any(p.startswith(prefix) for p in paths):
        raise ManifestError(f"python.wheels {env.wheels!r} holds no file of the release")
    if len(env.imports) > 64 or any(
        not name or len(name) > 128 or not all(part.isidentifier() for part in name.split("."))
        for name in env.imports
    ):
        raise ManifestError("python.imports must be at most 64 dotted module names")


def sign_manifest(signed: bytes, signers: Iterable[Ed25519PrivateKey]) -> SignedManifest:
    """Sign canonical manifest bytes with each key."""
    sigs = [Signature(keyid=keys.keyid(k), sig=keys.sign(k, DOMAIN, signed)) for k in signers]
    return SignedManifest(signed=signed, signatures=sigs)


def add_signatures(signed: SignedManifest, more: Iterable[Signature]) -> SignedManifest:
    """Combine signatures made elsewhere (k-of-n signing by several holders)."""
    have = {s.keyid for s in signed.signatures}
    extra = [s for s in more if s.keyid not in have]
    return SignedManifest(signed=signed.signed, signatures=[*signed.signatures, *extra])
