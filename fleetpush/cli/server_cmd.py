"""`fleetpush server`: run the releaser (built in server/)."""

from __future__ import annotations

import argparse

from .exitcodes import EXIT_FAILURE


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("server", help="run the releaser")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    print("fleetpush server: not built yet")
    return EXIT_FAILURE
