"""Hash algorithms a manifest may name (specs/PROTOCOL.md §7.2).

``sha256`` is always available. ``blake3`` is used when the optional
``blake3`` package is installed (``pip install fleetpush[fast]``); a peer
without it refuses blake3 manifests with a clear error rather than guessing.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final, Protocol

from .errors import ManifestError

_blake3: Any
try:  # optional dependency
    import blake3 as _blake3
except ImportError:  # pragma: no cover - depends on the install
    _blake3 = None


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...
    def digest(self) -> bytes: ...


def available_algorithms() -> tuple[str, ...]:
    return ("sha256", "blake3") if _blake3 is not None else ("sha256",)


def new_hasher(algorithm: str) -> Hasher:
    """A fresh hasher. Raises :class:`ManifestError` for an unknown algorithm."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        if _blake3 is None:
            raise ManifestError("manifest uses blake3 but the blake3 package is not installed")
        # Large inputs hash on several threads; the GIL is released meanwhile.
        hasher: Hasher = _blake3.blake3(max_threads=_blake3.blake3.AUTO)
        return hasher
    raise ManifestError(f"unknown hash algorithm {algorithm!r}")


#: Below this, blake3 hashes on the calling thread: for a content-defined
#: chunk (16-256 KiB) waking its thread pool cost more than the hashing, and
#: the caller waited on a condition variable meanwhile (issue 14: 0.25 vs 0.16
#: CPU s/GiB for 64 KiB inputs, and the device's trio thread blocked).
_THREADED_MIN: Final = 1024 * 1024


def digest(algorithm: str, data: bytes | bytearray | memoryview) -> bytes:
    """The digest of ``data``. Raises :class:`ManifestError` for an unknown algorithm."""
    if algorithm == "blake3" and _blake3 is not None and len(data) < _THREADED_MIN:
        return bytes(_blake3.blake3(data).digest())
    h = new_hasher(algorithm)
    h.update(data)
    return h.digest()


DIGEST_SIZE = 32  # both sha256 and blake3 (default length)
