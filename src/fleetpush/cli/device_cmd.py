"""Device-side commands: ``fleetpush agent``, ``fleetpush update``, ``fleetpush status``.

All read the device configuration (``--config agent.toml``, see
fleetpush.client.config); flags override it. Exit codes
(fleetpush.cli.exitcodes): 0 done (``update --check``: an update is
available), 10 nothing to do, 1 the update failed, 2 bad arguments or config,
3 releaser unreachable, 4 device not accepted, 5 no such version.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from typing import Any

import trio

from .exitcodes import (
    EXIT_NO_UPDATE,
    EXIT_OK,
    EXIT_USAGE,
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", default="agent.toml", help="device config (default: agent.toml)"
    )
    p.add_argument("--server", help="releaser HOST:PORT[,HOST:PORT...] (overrides the config)")
    p.add_argument("--state-dir", help="state directory (overrides the config)")
    p.add_argument("--app-root", help="app root directory (overrides the config)")
    p.add_argument("--device-id", help="device id (default: the config's, else the hostname)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "agent",
        help="run an app under supervision and keep it updated",
        description="Run APP_COMMAND as a supervised child: restart it when it dies, apply "
        "updates between stopping and starting it, roll back a version that fails its trial.",
    )
    _common(p)
    p.add_argument(
        "app_command", nargs=argparse.REMAINDER, help="-- the app command (else: config 'command')"
    )
    p.set_defaults(func=_agent)

    p = sub.add_parser(
        "update",
        help="check for, download and apply an update now",
        description="Without options: download the newest release offered and apply it, then "
        "start the app (config 'command') in its place.",
    )
    _common(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="only say whether an update is available")
    g.add_argument("--rollback", action="store_true", help="restore the newest backup")
    p.add_argument("--to", metavar="VERSION", help="install this version (must be offered)")
    p.add_argument(
        "--force",
        action="store_true",
        help="with --to: install a release marked bad or not offered to this device's channel",
    )
    p.add_argument("--no-start", action="store_true", help="apply but do not start the app")
    p.add_argument(
        "--timeout", type=float, help="releaser deadline in seconds (default: check_timeout)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_update)

    p = sub.add_parser("status", help="show the device's version, update and app state")
    _common(p)
    p.add_argument("--offline", action="store_true", help="do not ask the releaser (default)")
    p.add_argument(
        "--check",
        action="store_true",
        help="ask the releaser for the newest release (through the agent if one runs)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)


def _load(args: argparse.Namespace) -> Any:
    from fleetpush.client.config import UpdaterConfig

    return UpdaterConfig.from_toml(
        args.config,
        server=args.server,
        state_dir=args.state_dir,
        app_root=args.app_root,
        device_id=args.device_id,
    )


def _fail(message: str, code: int) -> int:
    print(f"fleetpush: {message}", file=sys.stderr)
    return code


def _error_code(e: BaseException) -> int:
    """README.md's exit code for ``e`` (the one table: fleetpush.cli.failures)."""
    from .failures import exit_code_for

    return exit_code_for(e)


def _message(e: BaseException) -> str:
    """``e`` in the user's words: no RPC method names, no ``[code]`` numbers."""
    from .failures import message

    return message(e)


# --- agent -----------------------------------------------------------------------------


def _agent(args: argparse.Namespace) -> int:
    from fleetpush.client.agent import run_agent
    from fleetpush.protocol.errors import FleetpushError

    command = list(args.app_command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        config = _load(args)
        if not command and not config.command:
            return _fail(
                "no app command: give one after -- or set 'command' in the config", EXIT_USAGE
            )
        return trio.run(run_agent, config, command or None)
    except FleetpushError as e:
        return _fail(_message(e), _error_code(e))
    except BaseExceptionGroup as group:
        # trio's nurseries wrap what their tasks raise; a FleetpushError in
        # there is still one of ours: one line, no traceback (issue 10, item 12).
        ours, rest = group.split(FleetpushError)
        if ours is None or rest is not None:
            raise
        first = _first_leaf(ours)
        return _fail(_message(first), _error_code(first))


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception inside ``group`` that is not itself a group."""
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


# --- update ----------------------------------------------------------------------------


class _CliHost:
    """``fleetpush update``: apply in-process, then exec the app (unless --no-start)."""

    supervises = True  # no trial bookkeeping in this short-lived process

    def __init__(self, start: bool) -> None:
        self.start = start
        self.applied: str | None = None

    async def apply(self, ctx: Any, version: str) -> None:
        from fleetpush.client.applymode import reexec_into_apply_mode, write_saved_args
        from fleetpush.client.data_settings import DataSettings
        from fleetpush.client.install import apply_staged

        cfg = ctx.config
        if self.start and cfg.command:
            argv = list(cfg.command)
            exe = shutil.which(argv[0]) or argv[0]
            cwd = str(cfg.cwd or cfg.app_root)
            await trio.to_thread.run_sync(
                lambda: write_saved_args(
                    cfg.state_dir, version, argv, exe, cwd, data=DataSettings.of(cfg)
                )
            )
            await ctx.reporter.progress("restarting", version)
            reexec_into_apply_mode(cfg.state_dir, cfg.app_root, version)
        await trio.to_thread.run_sync(
            lambda: apply_staged(
                cfg.state_dir,
                cfg.app_root,
                version,
                time.time(),
                trial_seconds=cfg.trial_seconds,
                data=DataSettings.of(cfg),
            )
        )
        ctx.store.reload()
        self.applied = version

    async def restart_after_rollback(self, ctx: Any) -> None:
        return None


def _update(args: argparse.Namespace) -> int:
    from fleetpush.protocol.errors import FleetpushError

    from .device_owner import owner_failure, update_via_owner, with_owner

    if args.force and not args.to:
        return _fail("update --force: only with --to VERSION", EXIT_USAGE)
    try:
        config = _load(args)
        timeout = args.timeout or config.check_timeout
        # The running agent (or embedded updater) does it; else this command,
        # holding the owner lock (issue 11, "One owner").
        return with_owner(
            config,
            "fleetpush update",
            lambda: update_via_owner(args, config, timeout),
            lambda: trio.run(_update_async, args, config),
        )
    except FleetpushError as e:
        code = owner_failure(e)
        return code if code is not None else _fail(_message(e), _error_code(e))


def _print(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc, sort_keys=True) if args.json else text)


async def _update_async(args: argparse.Namespace, config: Any) -> int:
    from fleetpush.client import install
    from fleetpush.client.device_ops import DeviceOps
    from fleetpush.client.local import ControlError
    from fleetpush.client.updater import Updater
    from fleetpush.protocol.errors import FleetpushError

    from .device_owner import report_update

    config = config.evolve(auto_check=False)
    timeout = args.timeout or config.check_timeout
    if args.rollback:
        result = await trio.to_thread.run_sync(
            lambda: install.rollback(config.state_dir, config.app_root, "rolled back by hand")
        )
        from fleetpush.client.data_steps import describe_rollback, rollback_fields

        doc = {
            "rolled_back": result.failed_version,
            "installed": result.version,
            **rollback_fields(result.data_restored),
        }
        _print(args, doc, describe_rollback(doc))
        return EXIT_OK
    host = _CliHost(start=not args.no_start)
    updater = Updater(config, host=host)
    ops = DeviceOps(updater)  # the agent's rules: --to refuses bad/unoffered releases
    async with updater.connected():
        if args.check:
            info = await updater.check(timeout=timeout)
            doc = {
                "installed": info.installed,
                "newest": info.offered,
                "available": info.available,
                "reason": info.reason,
            }
            _print(
                args,
                doc,
                f"installed {info.installed}; newest offered {info.offered or '-'}; "
                + ("update available" if info.available else f"no update ({info.reason})"),
            )
            return EXIT_OK if info.available else EXIT_NO_UPDATE
        try:
            done = await ops.update({"to": args.to, "force": args.force, "timeout": timeout})
        except ControlError as e:  # a refusal: one sentence and its code
            return _fail(str(e), e.code)
        except FleetpushError as e:
            if args.json:
                _print(args, {"updated": False, "error": _message(e)}, "")
            return _fail(f"update failed: {_message(e)}", _error_code(e))
    return report_update(args, done)


# --- status ----------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    """Through the running owner, else from the state dir; never a second releaser
    session with the device's identity (device_owner.status)."""
    from fleetpush.protocol.errors import FleetpushError

    from .device_owner import owner_failure, status

    try:
        config = _load(args)
        return status(args, config)
    except FleetpushError as e:
        code = owner_failure(e)
        return code if code is not None else _fail(_message(e), _error_code(e))
