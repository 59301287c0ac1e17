"""``fleetpush app start|stop|restart [DEVICE...] [--group G]``: a supervised app.

Without DEVICE or ``--group``: this device's app, through the running
agent's control socket (issue 11). Only an agent supervises an app: with no
agent running there is no app to act on, and nothing is started in the
user's shell. With DEVICE... or ``--group``: those devices' apps, through
the releaser (the console config; specs/PROTOCOL.md §7.7 ``app_control``),
one line per device with its new app status or why not.

``fleetpush logs DEVICE [--lines N] [--follow]``: a device's app output,
through the releaser (``app_logs``).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import aclosing

from fleetpush.operator import OperatorClient

from . import output
from .console import connection_parent, json_parent, print_json, run_operator
from .device_owner import ask, fail, owner_failure
from .exitcodes import EXIT_FAILURE, EXIT_OK
from .failures import UsageError

#: Deadline of an app request: a stop waits up to stop_timeout, then SIGKILL.
APP_DEADLINE = 120.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "app",
        parents=[connection_parent(), json_parent()],
        help="start, stop or restart a supervised app (this device's, or remote ones)",
        description="Without DEVICE or --group: ask this device's running `fleetpush agent` "
        "(its control socket; --config is then agent.toml) to start, stop or restart its "
        "app; nothing is done without a running agent. With DEVICE... or --group: ask those "
        "devices through the releaser (--config is then the console config); each answers "
        "with its app's new status, or why it could not.",
    )
    p.add_argument("action", choices=("start", "stop", "restart"))
    p.add_argument("devices", nargs="*", metavar="DEVICE", help="devices to act on (remote)")
    p.add_argument("--group", help="every device of this group (remote)")
    local = p.add_argument_group("this device (without DEVICE or --group)")
    local.add_argument("--state-dir", help="state directory (overrides agent.toml)")
    local.add_argument("--app-root", help="app root directory (overrides agent.toml)")
    local.add_argument("--device-id", help="device id (overrides agent.toml)")
    p.set_defaults(func=_app)

    logs = sub.add_parser(
        "logs",
        parents=[connection_parent(), json_parent()],
        help="a device's app output, through the releaser",
        description="The last lines a device's supervised app wrote (its agent keeps "
        "`log_lines`, default 1000); --follow keeps printing new ones until Ctrl-C or the "
        "device disconnects. The device caps what it sends (about 256 KiB/s) and says how "
        "many lines it left out.",
    )
    logs.add_argument("device_id", metavar="DEVICE")
    logs.add_argument("--lines", "-n", type=int, default=100, metavar="N",
                      help="how many of the last lines (default 100, at most 1000)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.set_defaults(func=_logs)


def _app(args: argparse.Namespace) -> int:
    if args.devices or args.group:
        return _remote_app(args)
    return _local_app(args)


def _remote_app(args: argparse.Namespace) -> int:
    async def body(op: OperatorClient) -> int:
        results = await op.app_control(args.action, args.devices, group=args.group)
        if args.json:
            print_json(results)
        else:
            for r in results:
                if r.ok and r.status is not None:
                    pid = r.status.pid or "-"
                    print(f"{r.device_id}: app {r.status.state} (pid {pid})")
                else:
                    print(f"{r.device_id}: could not {args.action} the app: {r.error}")
        if not results:
            print(f"no devices in group {args.group}" if args.group else "no devices")
        # Every device that could not is a failure of the command (exit 1).
        return EXIT_OK if all(r.ok for r in results) and results else EXIT_FAILURE

    return run_operator(args, body)


def _logs(args: argparse.Namespace) -> int:
    if not 0 <= args.lines <= 1000:
        raise UsageError("--lines must be between 0 and 1000")

    async def body(op: OperatorClient) -> int:
        if not args.follow:
            lines = await op.app_logs(args.device_id, args.lines)
            if args.json:
                print_json(lines)
            else:
                for line in lines:
                    print(line)
            return EXIT_OK
        async with aclosing(op.follow_logs(args.device_id, args.lines)) as follow:
            async for batch in follow:
                if args.json:
                    print(output.json_line({"lines": batch.lines, "dropped": batch.dropped}))
                else:
                    for line in batch.lines:
                        print(line)
                    if batch.dropped:
                        print(f"[fleetpush: {batch.dropped} lines left out]")
                sys.stdout.flush()
        print(f"fleetpush: logs: {args.device_id} disconnected", file=sys.stderr)
        return EXIT_FAILURE

    return run_operator(args, body)


def _local_app(args: argparse.Namespace) -> int:
    from .device_cmd import _load

    if args.config is None:
        args.config = "agent.toml"
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
