"""fleetpush: push-first, verifiable, crash-safe software updates for device fleets."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fleetpush")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__"]
