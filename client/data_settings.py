"""What the install engine needs to know about the app's data (issue 12, part 2).

A plain value built from the device configuration (``data_paths``,
``migrate_command``, ``migrate_timeout``, ``keep_backups``,
``backup_max_age``) and handed to ``apply_staged`` and the recovery code, so
neither reads the configuration itself (STYLE.md §8). The parsing helpers
here are also the configuration's validators.

Data paths are relative to the app root, where an app usually keeps them
(``data/app.db``, ``config.toml``), or absolute (``/var/lib/app/app.db``). A
relative path may not leave the app root: ``..`` is refused rather than
resolved, so a typo cannot make a rollback overwrite a file elsewhere.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any, Final

from attrs import field, frozen

_AGE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_age(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` or a number of seconds.

    Raises ValueError (its message names the problem in words).
    """
    m = _AGE_RE.match(str(text))
    if m is None:
        raise ValueError(f"{text!r} is not an age like 7d, 12h, 30m or 90s")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return seconds


def check_data_path(path: str) -> None:
    """Refuse an empty path, ``..`` anywhere, or a relative path naming the app root itself.

    Raises ValueError.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError("a data path must be a non-empty string")
    p = PurePosixPath(path)
    if ".." in p.parts:
        raise ValueError(f"{path!r} contains '..': give a path inside the app root, or absolute")
    if not p.is_absolute() and str(p) in ("", "."):
        raise ValueError(f"{path!r} is the app root itself: name the data files in it")
    if p.is_absolute() and str(p) == "/":
        raise ValueError(f"{path!r}: the filesystem root is not a data path")


def locate(app_root: Path, path: str) -> tuple[Path, str]:
    """``(directory, relative path)`` of a data path, for fsutil's root-relative calls.

    A relative path stays under the app root (symlinks in it are refused by
    fsutil's safe walk); an absolute one is its own parent directory and name.
    """
    p = PurePosixPath(path)
    if p.is_absolute():
        return Path(str(p.parent)), p.name
    return app_root, p.as_posix()


@frozen(kw_only=True)
class Retention:
    """Keep at most ``keep`` backups (0: no count limit), none older than ``max_age`` s."""

    keep: int = 5
    max_age: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"keep": self.keep, "max_age": self.max_age}

    @classmethod
    def from_json(cls, data: object) -> Retention:
        """The policy a journal recorded; the defaults for anything unreadable."""
        if not isinstance(data, dict):
            return cls()
        keep, age = data.get("keep"), data.get("max_age")
        return cls(
            keep=keep if isinstance(keep, int) and keep >= 0 else 5,
            max_age=float(age) if isinstance(age, int | float) and age > 0 else None,
        )


@frozen(kw_only=True)
class DataSettings:
    """The data part of an apply (see the module docstring)."""

    paths: tuple[str, ...] = ()
    migrate_command: tuple[str, ...] | None = None
    migrate_timeout: float = 300.0
    retention: Retention = field(factory=Retention)

    def to_json(self) -> dict[str, Any]:
        return {
            "paths": list(self.paths),
            "migrate_command": None if self.migrate_command is None else list(self.migrate_command),
            "migrate_timeout": self.migrate_timeout,
            "retention": self.retention.to_json(),
        }

    @classmethod
    def from_json(cls, data: object) -> DataSettings:
        """What apply mode was handed (saved_args.json). Raises ValueError if malformed."""
        if not isinstance(data, dict):
            raise ValueError("data settings must be a JSON object")
        paths, command, timeout = (
            data.get("paths"),
            data.get("migrate_command"),
            data.get("migrate_timeout", 300.0),
        )
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError("data paths must be a list of strings")
        for p in paths:
            check_data_path(p)
        if command is not None and not (
            isinstance(command, list) and command and all(isinstance(c, str) for c in command)
        ):
            raise ValueError("migrate_command must be a non-empty list of strings")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError("migrate_timeout must be a positive number")
        return cls(
            paths=tuple(paths),
            migrate_command=None if command is None else tuple(command),
            migrate_timeout=float(timeout),
            retention=Retention.from_json(data.get("retention")),
        )

    @classmethod
    def of(cls, config: Any) -> DataSettings:
        """From an UpdaterConfig (typed loosely: this module must not import config.py)."""
        age = config.backup_max_age
        return cls(
            paths=tuple(config.data_paths),
            migrate_command=config.migrate_command,
            migrate_timeout=float(config.migrate_timeout),
            retention=Retention(
                keep=int(config.keep_backups), max_age=None if age is None else parse_age(age)
            ),
        )


__all__ = ["DataSettings", "Retention", "check_data_path", "locate", "parse_age"]
