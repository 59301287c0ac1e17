"""``fleetpush notify-update``: an "Update available" box on stderr, for CLI apps' users.

A shell-script app run by ``fleetpush agent`` calls it (the agent puts
``FLEETPUSH_CONTROL_SOCKET`` in its environment); client/notify.py decides,
at most once per 24 h, silenced by ``--quiet`` or ``FLEETPUSH_NO_UPDATE_NOTIFY=1``.
"""

from __future__ import annotations

import argparse
import sys

from .exitcodes import EXIT_OK, EXIT_UNREACHABLE


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "notify-update",
        help="tell the user on stderr that an update is available (at most once a day)",
        description="Print an 'Update available: X -> Y' box on stderr when the device's "
        "owner (fleetpush agent) knows a newer release, at most once per 24 h. Silenced by "
        "--quiet or FLEETPUSH_NO_UPDATE_NOTIFY=1. The control socket comes from "
        "$FLEETPUSH_CONTROL_SOCKET (set for the agent's app) or --state-dir.",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing")
    p.add_argument("--state-dir", help="the device's state directory")
    p.set_defaults(func=_notify)


def _notify(args: argparse.Namespace) -> int:
    from fleetpush.client.local import NoOwner
    from fleetpush.client.notify import notify_update

    try:
        notify_update(quiet=args.quiet, state_dir=args.state_dir)
    except NoOwner as e:
        if not args.quiet:
            print(f"fleetpush: notify-update: {e} [is fleetpush agent running?]", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK
