"""`fleetpush devices [filters]`, `devices show ID`, `devices accept|reject|forget ID`."""

from __future__ import annotations

import argparse

from fleetpush.operator import OperatorClient

from . import output, p2p_show
from .console import connection_parent, json_parent, print_json, run_operator, to_jsonable
from .exitcodes import EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "devices",
        parents=[connection_parent(), json_parent()],
        help="list devices; accept or reject pending ones",
        description=(
            "Without a subcommand: list the registered devices (id, app, version, channel, "
            "group, update state, connected, last seen, supervised app status; BAD PEER: "
            "times it was reported for serving a chunk that failed its digest). "
            "`devices accept ID` / `devices reject ID` decide a pending enrollment; "
            "`devices forget ID [--force]` deletes a device from the registry."
        ),
    )
    p.add_argument("--app", help="only devices of this application")
    p.add_argument("--group", help="only devices in this group")
    p.add_argument("--state", help="only devices in this update state (failed, trial, ...)")
    p.add_argument("--version", help="only devices running this version")
    online = p.add_mutually_exclusive_group()
    online.add_argument(
        "--connected", dest="connected", action="store_const", const=True,
        help="only devices connected now",
    )
    online.add_argument(
        "--disconnected", dest="connected", action="store_const", const=False,
        help="only devices not connected now",
    )
    p.set_defaults(func=_list)
    ds = p.add_subparsers(dest="devices_command", metavar="SUBCOMMAND")
    s = ds.add_parser(
        "show",
        parents=[connection_parent(), json_parent()],
        help="everything about one device",
        description=(
            "Every field of one device, its supervised app's status and last log lines, "
            "its newest pushes and its newest events."
        ),
    )
    s.add_argument("device_id", metavar="ID")
    s.add_argument(
        "--history", type=int, default=30, metavar="N", help="newest events to show (default 30)"
    )
    s.set_defaults(func=_show)
    for decision, verb in (("accepted", "accept"), ("rejected", "reject")):
        d = ds.add_parser(
            verb,
            parents=[connection_parent(), json_parent()],
            help=f"{verb} a device's enrollment",
        )
        d.add_argument("device_id", metavar="ID")
        d.set_defaults(func=_enroll, decision=decision)
    f = ds.add_parser(
        "forget",
        parents=[connection_parent(), json_parent()],
        help="delete a device from the registry",
        description=(
            "Delete a device's registry entry and its undelivered pushes (recorded as a "
            "`forgotten` event). A connected device is refused unless --force, which "
            "disconnects it; a device that connects again is enrolled anew."
        ),
    )
    f.add_argument("device_id", metavar="ID")
    f.add_argument("--force", action="store_true", help="disconnect the device if connected")
    f.set_defaults(func=_forget)


def _list(args: argparse.Namespace) -> int:
    async def body(op: OperatorClient) -> int:
        devices = await op.list_devices(
            app=args.app, group=args.group, state=args.state, version=args.version,
            connected=args.connected,
        )
        bad = p2p_show.bad_counts(await p2p_show.fetch(op, app=args.app))
        if args.json:
            rows = to_jsonable(devices)
            for row in rows:
                row["bad_peer_reports"] = bad.get(row["device_id"], 0)
            print_json(rows)
        else:
            output.print_devices(devices, bad=bad)
        return EXIT_OK

    return run_operator(args, body)


def _show(args: argparse.Namespace) -> int:
    async def body(op: OperatorClient) -> int:
        detail = await op.get_device(args.device_id, history=max(0, min(args.history, 1000)))
        view = await p2p_show.fetch(op, device_id=args.device_id)
        if args.json:
            doc = to_jsonable(detail)
            doc["bad_peer_reports"] = p2p_show.reports_json(view, args.device_id)
            print_json(doc)
        else:
            output.print_device_detail(detail)
            lines = p2p_show.report_lines(view, args.device_id)
            if view is None:
                print("\nreported as a bad peer: not known (the releaser predates peer delivery)")
            else:
                print("\nreported as a bad peer:" if lines else "\nreported as a bad peer: never")
            for line in lines:
                print(line)
        return EXIT_OK

    return run_operator(args, body)


def _enroll(args: argparse.Namespace) -> int:
    async def body(op: OperatorClient) -> int:
        info = await op.set_enrollment(args.device_id, args.decision)
        if args.json:
            print_json(info)
        else:
            print(f"{info.device_id}: {info.enrollment}")
        return EXIT_OK

    return run_operator(args, body)


def _forget(args: argparse.Namespace) -> int:
    async def body(op: OperatorClient) -> int:
        result = await op.forget_device(args.device_id, force=args.force)
        if args.json:
            print_json(result)
        else:
            note = " (disconnected)" if result.disconnected else ""
            print(f"{result.device_id}: forgotten{note}")
        return EXIT_OK

    return run_operator(args, body)
