"""The `fleetpush` command line (placeholder until the console issue lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("fleetpush: no commands yet", file=sys.stderr)
    return 2
