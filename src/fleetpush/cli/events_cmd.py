"""`fleetpush events`: the releaser's stored history, the audit trail (issue 13, part 2).

Who promoted, pushed, accepted or forgot what, and every device's outcomes,
queried from the releaser's database with filters; each filter walks its own
index there, so the answer is quick on a million events. Kept for
``event_retention`` (default 90 days) and at most ``history_limit`` events.
"""

from __future__ import annotations

import argparse
import time

from fleetpush.operator import OperatorClient
from fleetpush.protocol.durations import DurationError, parse_duration

from . import output
from .console import connection_parent, json_parent, print_json, run_operator
from .exitcodes import EXIT_OK
from .failures import UsageError

#: Events shown when --limit is not given.
DEFAULT_LIMIT = 100


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "events",
        parents=[connection_parent(), json_parent()],
        help="the stored event history (audit trail)",
        description=(
            "The newest stored events, oldest first: operator actions (release status, "
            "push, enrollment, forget, with the operator's name) and every device's "
            "progress and outcomes. --json prints one array of events."
        ),
    )
    p.add_argument("--device", metavar="ID", help="only events of this device")
    p.add_argument(
        "--type", dest="kinds", action="append", default=[], metavar="KIND",
        help="only events of this kind (repeatable): progress, report, push, "
        "release_status, enrollment, forgotten, connected, disconnected, ...",
    )
    p.add_argument("--push", metavar="ID", help="only events of this push")
    p.add_argument("--since", metavar="AGE", help="only events younger than AGE (30m, 2h, 7d)")
    p.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
        help=f"at most the newest N events (default {DEFAULT_LIMIT})",
    )
    p.set_defaults(func=_events)


def _events(args: argparse.Namespace) -> int:
    since = None
    if args.since is not None:
        try:
            since = time.time() - parse_duration(args.since)
        except DurationError as e:
            raise UsageError(f"--since: {e}") from e
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")

    async def body(op: OperatorClient) -> int:
        events = await op.list_events(
            device_id=args.device, kinds=args.kinds, since=since, push_id=args.push,
            limit=args.limit,
        )
        if args.json:
            print_json(events)
        elif not events:
            print("no events")
        else:
            for e in events:
                print(output.describe_event(e, dated=True))
        return EXIT_OK

    return run_operator(args, body)
