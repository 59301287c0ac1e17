"""Exit codes shared by every `fleetpush` command (documented in README.md)."""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1  # the operation ran and failed (e.g. demo deviation, update failed)
EXIT_USAGE: Final = 2  # bad arguments or config (argparse uses 2 as well)
EXIT_UNREACHABLE: Final = 3  # the releaser could not be reached
EXIT_AUTH: Final = 4  # authentication refused, or not enrolled
EXIT_NOT_FOUND: Final = 5  # no such release, device or version
EXIT_CONFLICT: Final = 6  # illegal transition or state conflict
EXIT_NO_UPDATE: Final = 10  # `fleetpush update --check`: nothing to do
