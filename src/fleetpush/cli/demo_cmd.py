"""`fleetpush demo`: the whole update story on this machine, in well under a minute."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fleetpush.protocol import FleetpushError

from .exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole update story locally (releaser, devices, update, rollback)",
        description=(
            "In a temporary workspace: make keys, start a releaser on 127.0.0.1, publish "
            "v1.0.0 of a small example app and run it on N supervised devices, push v1.1.0 "
            "(download, re-exec apply, restart, trial, commit) and ask every app its version, "
            "then push a broken v1.2.0 and watch every device roll back to v1.1.0 by itself. "
            "Exits 0 when everything happened as told, 1 with what went wrong otherwise."
        ),
    )
    p.add_argument("--devices", type=int, default=3, metavar="N", help="number of devices (3)")
    p.add_argument(
        "--keep", type=Path, metavar="DIR", help="use and keep DIR as the workspace (must be empty)"
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from fleetpush.demo.run import run_demo

    if not 1 <= args.devices <= 50:
        print("fleetpush: --devices must be between 1 and 50", file=sys.stderr)
        return EXIT_USAGE
    try:
        return EXIT_OK if run_demo(args.devices, args.keep) == 0 else EXIT_FAILURE
    except FleetpushError as e:
        print(f"\nfleetpush demo FAILED: {e}", file=sys.stderr)
        return EXIT_FAILURE
