"""Version rules (specs/PROTOCOL.md §7.1).

Versions are PEP 440, held as :class:`packaging.version.Version` in memory and
sent as their canonical string (``str(Version(v))``). Ordering of *releases* is
decided by the manifest ``sequence``, not by the version: a revert to old code
is published as a new release with a higher sequence (§8.2).
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from .errors import VersionError


def parse_version(text: str) -> Version:
    """Parse a PEP 440 version. Raises :class:`VersionError`."""
    if not isinstance(text, str):
        raise VersionError(f"a version must be a string, got {type(text).__name__}")
    try:
        return Version(text)
    except InvalidVersion as e:
        raise VersionError(f"{text!r} is not a valid PEP 440 version") from e


def canonical_version(text: str | Version) -> str:
    """The canonical wire form of a version (``"1.0"`` stays ``"1.0"``, ``"v1.0"`` -> ``"1.0"``)."""
    v = text if isinstance(text, Version) else parse_version(text)
    return str(v)


def is_canonical(text: str) -> bool:
    try:
        return canonical_version(text) == text
    except VersionError:
        return False
