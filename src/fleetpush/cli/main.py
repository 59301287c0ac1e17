"""The `fleetpush` command line: one entry point, one module per command group.

Each module in ``COMMAND_MODULES`` defines ``register(subparsers)``, which adds
its subcommands and sets ``func`` (returning an exit code) on each parser.
Exit codes are shared (see :mod:`fleetpush.cli.exitcodes`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from fleetpush import __version__

from . import failures
from .exitcodes import EXIT_USAGE

#: Command modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "fleetpush.cli.demo_cmd",
    "fleetpush.cli.keys_cmd",
    "fleetpush.cli.root_cmd",
    "fleetpush.cli.release_cmd",
    "fleetpush.cli.devices_cmd",
    "fleetpush.cli.push_cmd",
    "fleetpush.cli.deploy_cmd",
    "fleetpush.cli.watch_cmd",
    "fleetpush.cli.events_cmd",
    "fleetpush.cli.operator_cmd",
    "fleetpush.cli.server_cmd",
    "fleetpush.cli.device_cmd",
    "fleetpush.cli.app_cmd",
    "fleetpush.cli.notify_cmd",
    "fleetpush.cli.bench_cmd",
)


#: The device service logs at INFO by default (the releaser keeps WARNING: it logs
#: per connection, and a fleet is thousands of them).
SERVICES = frozenset({"agent"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetpush",
        description="Push-first, verifiable, crash-safe software updates for device fleets.",
    )
    parser.add_argument("--version", action="version", version=f"fleetpush {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeatable)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The agent says what it does at INFO without -v (an unreachable releaser
    # must show); one-shot commands stay quiet.
    base = logging.INFO if args.command in SERVICES else logging.WARNING
    level = max(logging.DEBUG, base - 10 * min(args.verbose, 2))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code = int(func(args))
        sys.stdout.flush()  # here, not at exit: a closed pipe is handled below
        return code
    except BaseException as e:  # the one place every failure is worded
        return _failed(e, verbose=args.verbose > 0)


def _failed(e: BaseException, *, verbose: bool) -> int:
    """What a command let escape: one line and its exit code (fleetpush.cli.failures).

    Re-raises ``SystemExit`` and a group of several unrelated errors (a bug
    report deserves the whole traceback).
    """
    if isinstance(e, SystemExit):
        raise e
    inner = failures.unwrap(e)
    if isinstance(inner, KeyboardInterrupt):
        return 130
    if isinstance(inner, BrokenPipeError):
        # `fleetpush watch | head -1`: the reader left. Point stdout at
        # /dev/null so the interpreter's final flush cannot raise again, and
        # exit as a process killed by SIGPIPE would be reported (128 + 13).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return failures.EXIT_BROKEN_PIPE
    if isinstance(inner, BaseExceptionGroup) or not isinstance(inner, Exception):
        raise e
    return failures.report(e, verbose=verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
