"""`fleetpush deploy create|list|show|pause|resume|abort` (specs/PROTOCOL.md §7.7.1).

A deployment rolls a release out in phases, a few devices at a time, and
halts itself when too many fail; `fleetpush push` stays the one-shot form.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.table import Table

from fleetpush.operator import OperatorClient
from fleetpush.protocol.messages import DEPLOYMENT_DEVICE_STATES, DeployCreate, DeploymentInfo

from . import output, p2p_show
from .console import connection_parent, json_parent, print_json, run_operator, to_jsonable
from .exitcodes import EXIT_OK
from .failures import UsageError


def _percent(text: str) -> float:
    """``5%`` or ``5`` -> 5.0 (argparse type)."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (e.g. 5%)") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: a percentage is between 0% and 100%")
    return value


def _phases(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "deploy",
        help="roll a release out in phases, halting itself when too many devices fail",
        description=(
            "A deployment pushes a release to its targets phase by phase (--phases), at most "
            "--max-concurrent devices at a time, and halts itself when the share of failed "
            "devices reaches --halt-after-failures once --min-executed devices finished. A "
            "device succeeds when its trial commits; it fails on an apply error, a rollback, "
            "an unconfirmed trial, or no progress for --device-timeout seconds."
        ),
    )
    ds = p.add_subparsers(dest="deploy_command", metavar="SUBCOMMAND", required=True)

    c = ds.add_parser(
        "create",
        parents=[connection_parent(), json_parent()],
        help="create a deployment and start it",
    )
    c.add_argument("app", metavar="APP")
    c.add_argument("version", metavar="VERSION")
    t = c.add_mutually_exclusive_group(required=True)
    t.add_argument("--device", action="append", metavar="ID", help="a target device (repeatable)")
    t.add_argument("--group", metavar="G", help="every accepted device of APP in group G")
    t.add_argument("--all", action="store_true", help="every accepted device of APP")
    c.add_argument(
        "--percent", type=_percent, default=100.0, metavar="P%", help="only P%% of the targets"
    )
    c.add_argument(
        "--phases",
        type=_phases,
        default=[],
        metavar="LIST",
        help="cumulative phases, percentages or counts: 1%%,10%%,50%%,100%% (default: one)",
    )
    c.add_argument(
        "--max-concurrent", type=int, default=0, metavar="N", help="devices updating at once"
    )
    c.add_argument(
        "--halt-after-failures",
        type=_percent,
        metavar="X%",
        help="halt when X%% of the finished devices failed",
    )
    c.add_argument(
        "--min-executed",
        type=int,
        metavar="N",
        help="apply the halt rule once N devices finished (default 1)",
    )
    c.add_argument(
        "--on-halt",
        choices=("pause", "revoke"),
        default="pause",
        help="what a halt does to the release: pause it for every channel (default) or revoke it",
    )
    c.add_argument(
        "--phase-wait",
        type=float,
        metavar="SECONDS",
        help="start the next phase after SECONDS even if devices of this one are still open",
    )
    c.add_argument(
        "--device-timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="a started device silent this long has failed (900)",
    )
    c.add_argument(
        "--retry-failed",
        action="store_true",
        help="include devices that failed this release in an earlier deployment",
    )
    c.add_argument(
        "--restart",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="restart the app to apply (default: the release's own setting)",
    )
    c.set_defaults(func=_create)

    ls = ds.add_parser("list", parents=[connection_parent(), json_parent()], help="deployments")
    ls.add_argument("--app", help="only deployments of this application")
    ls.set_defaults(func=_list)

    s = ds.add_parser(
        "show",
        parents=[connection_parent(), json_parent()],
        help="a deployment: phase, counts by outcome, each device's outcome and reason",
        description=(
            "A deployment's phase, its counts by outcome, the bytes its devices reported "
            "getting from LAN peers and from the releaser (peer delivery, p2p = true), and "
            "each device's outcome and reason."
        ),
    )
    s.add_argument("deployment_id", metavar="ID")
    s.set_defaults(func=_show)

    for verb, text in (
        ("pause", "start no more devices until resumed (devices updating finish)"),
        ("resume", "start devices again (a halted deployment: its release is un-paused)"),
        ("abort", "end the deployment for good (devices updating finish)"),
    ):
        a = ds.add_parser(verb, parents=[connection_parent(), json_parent()], help=text)
        a.add_argument("deployment_id", metavar="ID")
        if verb == "resume":
            a.add_argument(
                "--retry-failed",
                action="store_true",
                help="start again the devices of this deployment that failed",
            )
        a.set_defaults(func=_control, verb=verb)


def _create(args: argparse.Namespace) -> int:
    if args.min_executed is not None and args.halt_after_failures is None:
        raise UsageError(
            "deploy create: --min-executed needs --halt-after-failures "
            "(it says when that rule applies)"
        )
    if args.max_concurrent < 0 or (args.min_executed is not None and args.min_executed < 1):
        raise UsageError("deploy create: --max-concurrent and --min-executed must be positive")
    if args.percent <= 0:
        raise UsageError("deploy create: --percent must be above 0%")
    if args.device_timeout < 1 or (args.phase_wait is not None and args.phase_wait < 0):
        raise UsageError(
            "deploy create: --device-timeout must be at least 1 second, --phase-wait not negative"
        )
    params = DeployCreate(
        app=args.app,
        version=args.version,
        devices=args.device or [],
        group=args.group,
        all=args.all,
        percent=args.percent,
        phases=args.phases,
        max_concurrent=args.max_concurrent,
        halt_after_failures=args.halt_after_failures,
        min_executed=args.min_executed or 1,
        on_halt=args.on_halt,
        phase_wait=args.phase_wait,
        device_timeout=args.device_timeout,
        retry_failed=args.retry_failed,
        restart=args.restart,
    )

    async def body(op: OperatorClient) -> int:
        info = await op.deploy_create(params)
        if args.json:
            print_json(info)
        else:
            print(
                f"deployment {info.deployment_id}: {info.app} {info.version} to "
                f"{info.targets} device(s) in {len(info.phases)} phase(s) "
                f"({', '.join(str(n) for n in info.phases)}); {_counts(info)}"
            )
            print(f"  follow it with: fleetpush deploy show {info.deployment_id}")
        return EXIT_OK

    return run_operator(args, body)


def _list(args: argparse.Namespace) -> int:
    async def body(op: OperatorClient) -> int:
        deployments = await op.deploy_list(app=args.app)
        if args.json:
            print_json(deployments)
            return EXIT_OK
        out = output.console()
        if not deployments:
            out.print("no deployments")
            return EXIT_OK
        table = Table(box=None, pad_edge=False)
        # Ids, versions and states are never cut short (a pipe is 80 columns wide):
        # the counts and the reason wrap instead.
        for col in ("DEPLOYMENT", "APP", "VERSION", "STATE", "PHASE"):
            width = max(len(col), *(len(str(_cell(d, col))) for d in deployments))
            table.add_column(col, no_wrap=True, min_width=width)
        table.add_column("CREATED", no_wrap=True)
        table.add_column("DEVICES", overflow="fold")
        table.add_column("REASON", overflow="fold")
        now = time.time()
        for d in deployments:
            table.add_row(
                *(_cell(d, col) for col in ("DEPLOYMENT", "APP", "VERSION", "STATE", "PHASE")),
                output.ago(d.created, now),
                _counts(d),
                d.reason or "-",
            )
        out.print(table)
        return EXIT_OK

    return run_operator(args, body)


def _show(args: argparse.Namespace) -> int:
    async def body(op: OperatorClient) -> int:
        info = await op.deploy_show(args.deployment_id)
        split = await p2p_show.fetch(op, deployment_id=args.deployment_id)
        if args.json:
            doc = to_jsonable(info)
            doc["delivery"] = p2p_show.delivery_json(split)
            print_json(doc)
            return EXIT_OK
        print(_summary(info))
        print(
            "  delivery  "
            + (
                p2p_show.delivery_text(split.from_peers, split.from_releaser, split.downloads)
                if split
                else "not reported by this releaser (it predates peer delivery)"
            )
        )
        # Plain aligned columns, not a rich table: laying out 10,000 rows took
        # rich 4 s, plain text takes milliseconds (and a pipe gets every id whole).
        rows = [("DEVICE", "PHASE", "OUTCOME", "REASON")] + [
            (d.device_id, str(d.phase + 1), d.state, " ".join(d.reason.split()) or "-")
            for d in info.devices
        ]
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        lines = ("  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3] for r in rows)
        sys.stdout.write("\n".join(lines) + "\n")
        return EXIT_OK

    return run_operator(args, body)


def _control(args: argparse.Namespace) -> int:
    async def body(op: OperatorClient) -> int:
        if args.verb == "pause":
            info = await op.deploy_pause(args.deployment_id)
        elif args.verb == "resume":
            info = await op.deploy_resume(args.deployment_id, retry_failed=args.retry_failed)
        else:
            info = await op.deploy_abort(args.deployment_id)
        if args.json:
            print_json(info)
        else:
            print(f"deployment {info.deployment_id}: {info.state}; {_counts(info)}")
        return EXIT_OK

    return run_operator(args, body)


def _cell(d: DeploymentInfo, col: str) -> str:
    if col == "PHASE":
        return f"{d.phase + 1}/{len(d.phases)}"
    return str(
        {"DEPLOYMENT": d.deployment_id, "APP": d.app, "VERSION": d.version}.get(col, d.state)
    )


def _counts(info: DeploymentInfo) -> str:
    parts = [f"{info.counts[s]} {s}" for s in DEPLOYMENT_DEVICE_STATES if info.counts.get(s)]
    return ", ".join(parts) or "no devices"


def _summary(info: DeploymentInfo) -> str:
    rule = "none"
    if info.halt_after_failures is not None:
        rule = (
            f"halt at {info.halt_after_failures:g}% failed once {info.min_executed} finished, "
            f"then {info.on_halt} the release"
        )
    lines = [
        f"deployment {info.deployment_id}: {info.app} {info.version}, {info.state}"
        + (f" ({info.reason})" if info.reason else ""),
        f"  created   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.created))}"
        f" by {info.operator}",
        f"  phase     {info.phase + 1} of {len(info.phases)} "
        f"(cumulative devices: {', '.join(str(n) for n in info.phases)})",
        f"  devices   {info.targets}: {_counts(info)}",
        f"  at once   {info.max_concurrent or 'no limit'}",
        f"  halt rule {rule}",
    ]
    return "\n".join(lines)
