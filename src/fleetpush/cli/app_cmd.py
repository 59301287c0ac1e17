"""``fleetpush app start|stop|restart``: the running agent's app, through its control socket.

Only an agent supervises an app (issue 11): with no agent running there is
no app to act on, and nothing is started in the user's shell.
"""

from __future__ import annotations

import argparse
import json

from .device_cmd import _common, _load
from .device_owner import ask, fail, owner_failure
from .exitcodes import EXIT_FAILURE, EXIT_OK

#: Deadline of an app request: a stop waits up to stop_timeout, then SIGKILL.
APP_DEADLINE = 120.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "app",
        help="start, stop or restart the app the running agent supervises",
        description="Ask the running `fleetpush agent` (through its control socket) to "
        "start, stop or restart its app. Nothing is done without a running agent.",
    )
    _common(p)
    p.add_argument("action", choices=("start", "stop", "restart"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_app)


def _app(args: argparse.Namespace) -> int:
    from fleetpush.client.local import NoOwner
    from fleetpush.protocol.errors import FleetpushError

    try:
        config = _load(args)
        doc = ask(config, "app", APP_DEADLINE, action=args.action)
    except NoOwner:
        return fail(
            f"app {args.action}: no agent runs for {config.state_dir} "
            "[start one with: fleetpush agent]",
            EXIT_FAILURE,
        )
    except FleetpushError as e:
        code = owner_failure(e)
        return code if code is not None else fail(f"app {args.action}: {e}", EXIT_FAILURE)
    if args.json:
        print(json.dumps(doc, sort_keys=True))
    else:
        print(f"app {doc.get('app_state')} (pid {doc.get('pid') or '-'})")
    return EXIT_OK
