"""`fleetpush push` (forced update or stage) and `fleetpush apply` (apply staged)."""

from __future__ import annotations

import argparse
import sys

from fleetpush.operator import OperatorClient

from .console import connection_parent, json_parent, print_json, run_operator
from .exitcodes import EXIT_OK, EXIT_USAGE


def _targets(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", required=True, help="the release version to send")
    p.add_argument("--app", help="application (required with --all; else from the devices)")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--device", action="append", metavar="ID", help="a target device (repeatable)")
    t.add_argument("--group", metavar="G", help="every device in group G")
    t.add_argument("--all", action="store_true", help="every device of --app")
    p.add_argument(
        "--restart",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="restart the app to apply (default: the release's own setting)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "push",
        parents=[connection_parent(), json_parent()],
        help="push a release to devices now (forced update, or --stage)",
        description=(
            "Send a forced update (__force_update__: download, then apply) to the targets; "
            "with --stage only download it, and apply later with `fleetpush apply`. "
            "Offline targets get the command when they next connect."
        ),
    )
    _targets(p)
    p.add_argument("--stage", action="store_true", help="download only; apply later")
    p.set_defaults(func=_push, mode=None)

    a = sub.add_parser(
        "apply",
        parents=[connection_parent(), json_parent()],
        help="apply a staged release on devices (__apply_update__)",
    )
    _targets(a)
    a.set_defaults(func=_push, mode="apply", stage=False)


def _push(args: argparse.Namespace) -> int:
    mode = args.mode or ("stage" if args.stage else "force")
    if args.all and not args.app:
        print("fleetpush: --all needs --app APP", file=sys.stderr)
        return EXIT_USAGE

    async def body(op: OperatorClient) -> int:
        app = args.app
        if app is None:
            app = await _app_of_targets(op, args)
        result = await op.push(
            app=app,
            version=args.version,
            mode=mode,
            restart=args.restart,
            devices=args.device or [],
            group=args.group,
            all=args.all,
        )
        if args.json:
            print_json(result)
        else:
            what = {"force": "pushed", "stage": "staged", "apply": "apply sent"}[mode]
            print(
                f"{what} {app} {args.version} (push {result.push_id}): "
                f"{len(result.targets)} target(s), {len(result.sent)} sent now, "
                f"{len(result.queued)} queued until they connect"
            )
            for device in result.sent:
                print(f"  sent    {device}")
            for device in result.queued:
                print(f"  queued  {device}")
        return EXIT_OK

    return run_operator(args, body)


async def _app_of_targets(op: OperatorClient, args: argparse.Namespace) -> str:
    """Without --app, the targets' one application (asks the releaser)."""
    from fleetpush.operator import BadRequest, NotFound

    devices = await op.list_devices(group=args.group)
    if args.device:
        wanted = set(args.device)
        devices = [d for d in devices if d.device_id in wanted]
        missing = wanted - {d.device_id for d in devices}
        if missing:
            raise NotFound(f"no such device: {', '.join(sorted(missing))}")
    apps = {d.app for d in devices if d.app}
    if len(apps) != 1:
        found = ", ".join(sorted(apps)) or "none"
        raise BadRequest(f"cannot tell the targets' app (found: {found}); pass --app APP")
    return apps.pop()
