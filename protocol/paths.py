"""Release file paths: the only shape a manifest may use (specs/PROTOCOL.md §7.3).

A path is relative, uses ``/`` as separator, and is already normalised: no
empty, ``.`` or ``..`` segment, no leading ``/``, no backslash, no NUL or other
control character, no drive letter, at most :data:`MAX_PATH_LEN` bytes. The
check is purely textual; adapters still open files relative to a directory
descriptor and refuse symlinks (defence in depth, specs/THREATS.md).
"""

from __future__ import annotations

from .errors import BadPath
from .limits import MAX_PATH_LEN


def check_path(path: str) -> str:
    """Return ``path`` if it is a safe, normalised relative path; raise :class:`BadPath`."""
    if not isinstance(path, str):
        raise BadPath(f"path must be a string, got {type(path).__name__}")
    if not path:
        raise BadPath("empty path")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_LEN:
        raise BadPath(f"path longer than {MAX_PATH_LEN} bytes: {path[:60]!r}...")
    if "\x00" in path:
        raise BadPath(f"NUL byte in path {path!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise BadPath(f"control character in path {path!r}")
    if "\\" in path:
        raise BadPath(f"backslash in path {path!r}")
    if path.startswith("/"):
        raise BadPath(f"absolute path {path!r}")
    if len(path) >= 2 and path[1] == ":":
        raise BadPath(f"drive letter in path {path!r}")
    for part in path.split("/"):
        if part == "..":
            raise BadPath(f"'..' in path {path!r}")
        if part in ("", "."):
            raise BadPath(f"path {path!r} is not normalised")
    return path


def check_paths(paths: list[str]) -> None:
    """Check each path and that no two are equal, or one is a directory of another."""
    seen: set[str] = set()
    for p in paths:
        check_path(p)
        if p in seen:
            raise BadPath(f"duplicate path {p!r}")
        seen.add(p)
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in seen:
                raise BadPath(f"{parent!r} is both a file and a directory of {p!r}")
