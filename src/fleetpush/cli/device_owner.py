"""Device commands and the device's one owner (issue 11; fleetpush.client.owner).

``fleetpush status``, ``update`` and ``app`` first ask the running owner (the
agent, or an app's embedded updater) through its control socket
(fleetpush.client.local). Only when nothing answers there do they take the
owner lock themselves and act directly, so a command never opens a second
releaser session with the device's identity and never changes files under a
running app. An owner that holds the lock but does not answer yet (an agent
starting) is waited for briefly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

from .exitcodes import EXIT_FAILURE, EXIT_OK

T = TypeVar("T")

#: How long a command waits for an owner that holds the lock to answer.
OWNER_WAIT: Final = 5.0

#: Deadline of a status request (local, cheap).
STATUS_DEADLINE: Final = 10.0


class _NoOwner(Exception):
    """Nothing answers on the socket and the lock is free: act directly."""


def fail(message: str, code: int) -> int:
    print(f"fleetpush: {message}", file=sys.stderr)
    return code


def with_owner(
    config: Any,
    role: str,
    via_owner: Callable[[], T],
    direct: Callable[[], T],
) -> T:
    """``via_owner()`` if an owner answers, else ``direct()`` holding the owner lock.

    ``via_owner`` raises :class:`~fleetpush.client.local.NoOwner` when nothing
    answers. Raises OwnerBusy (the lock is held but nobody answers within
    ``OWNER_WAIT``), StateError, and what the two callables raise.
    """
    from fleetpush.client.layout import StateLayout
    from fleetpush.client.local import NoOwner
    from fleetpush.client.owner import OwnerBusy, OwnerLock

    layout = StateLayout.of(config.state_dir)
    deadline = time.monotonic() + OWNER_WAIT
    while True:
        try:
            return via_owner()
        except NoOwner:
            pass
        try:
            lock = OwnerLock.acquire(layout, role)
        except OwnerBusy as e:
            if time.monotonic() >= deadline:
                raise OwnerBusy(f"{e}, and its control socket does not answer", e.pid) from e
            time.sleep(0.2)
            continue
        with lock:
            return direct()


def ask(config: Any, op: str, deadline: float, **args: Any) -> dict[str, Any]:
    """One request to the owner within ``deadline`` s. Raises NoOwner, ControlError."""
    from fleetpush.client.layout import StateLayout
    from fleetpush.client.local import request

    path = StateLayout.of(config.state_dir).control_socket
    return request(op, path=path, deadline=deadline, **args)


def print_doc(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc, sort_keys=True, default=str) if args.json else text)


# --- status ----------------------------------------------------------------------------

_TEXT_KEYS: Final = (
    "app",
    "installed",
    "newest",
    "update_available",
    "staged",
    "trial",
    "app_state",
    "pid",
    "uptime",
    "bad_releases",
    "root_version",
    "data_schema",
    "activity",
    "control_socket",
    "connected_to",
    "releaser",
    "p2p",
)


def _local_status(config: Any) -> dict[str, Any]:
    """What the state dir says, with no owner running (reads only)."""
    from fleetpush.client.agent import STATUS_FILE
    from fleetpush.client.child_record import live_child
    from fleetpush.client.config import ConfigError
    from fleetpush.client.layout import StateLayout
    from fleetpush.client.reporting import result_doc
    from fleetpush.client.roots import TrustedRoots
    from fleetpush.client.schema import describe_record
    from fleetpush.client.state import load_state

    s = load_state(config.state_dir)
    layout = StateLayout.of(config.state_dir)
    try:
        root_version: int | str | None = TrustedRoots.open(config).version
    except ConfigError as e:
        root_version = f"unreadable: {e}"
    doc: dict[str, Any] = {
        "app": config.app,
        "installed": s.installed_version or config.version,
        "sequence": s.installed_sequence,
        "staged": s.staged.version if s.staged else None,
        "trial": s.trial.version if s.trial else None,
        "bad_releases": list(s.bad_releases),
        "last_result": result_doc(s.last_result),
        "newest": None,
        "update_available": None,
        "control_socket": None,
        "owner": None,
        "root_version": root_version,
        "data_schema": describe_record(layout),
        # No agent runs: whatever agent-status.json says is history, not a live app.
        "app_state": None,
        "pid": None,
        "uptime": 0.0,
    }
    try:
        last = json.loads((Path(config.state_dir) / STATUS_FILE).read_text())
        doc["last_app_state"] = last.get("state")
    except (OSError, ValueError, AttributeError):
        pass
    # Whatever pid agent-status.json names may be gone, or reused: the app runs
    # only if the recorded child is alive and is that child (issue 11, item 6).
    child = live_child(StateLayout.of(config.state_dir).child_record)
    if child is None:
        doc["app_state"] = "not running (agent stopped)"
    else:
        doc["app_state"], doc["pid"] = "running (no agent supervises it)", child.pid
    return doc


async def _direct_check(config: Any) -> dict[str, Any]:
    """Ask the releaser with the device's identity: only while no owner runs.

    Raises Unreachable, RpcError, TrustError (FleetpushError).
    """
    from fleetpush.client.updater import Updater

    updater = Updater(config.evolve(auto_check=False))
    async with updater.connected():
        info = await updater.check()
    return {"newest": info.offered, "update_available": info.available}


def status(args: argparse.Namespace, config: Any) -> int:
    """``fleetpush status``: through the owner, else from the state dir."""
    from fleetpush.client.device_ops import error_code
    from fleetpush.client.health import health_fields
    from fleetpush.protocol.errors import FleetpushError

    check = bool(getattr(args, "check", False)) and not args.offline
    code = EXIT_OK

    def via_owner() -> dict[str, Any]:
        nonlocal code
        doc = ask(config, "status", STATUS_DEADLINE)
        if check:
            try:
                found = ask(config, "check", config.check_timeout + 5.0)
                # The owner's state after the check (its phase, newest...).
                doc = ask(config, "status", STATUS_DEADLINE)
                doc["newest"], doc["update_available"] = found["newest"], found["available"]
                doc["checked"] = True
            except FleetpushError as e:
                doc["releaser"] = f"check failed: {e}"
                code = error_code(e)
        return doc

    def direct() -> dict[str, Any]:
        nonlocal code
        doc = _local_status(config)
        if check:
            doc["releaser"] = "asked by this command (no agent runs)"
            try:
                doc.update(trio.run(_direct_check, config), checked=True)
            except FleetpushError as e:
                doc["releaser"] = f"unreachable: {e}"
                code = error_code(e)
        return doc

    if check:
        doc = with_owner(config, "fleetpush status --check", via_owner, direct)
    else:
        # Reading needs no lock: a command holding it (update) must not make status fail.
        from fleetpush.client.local import NoOwner

        try:
            doc = via_owner()
        except NoOwner:
            doc = direct()
    doc.update(health_fields(doc))  # the /health fields, after any check (client/health.py)
    if args.json:
        print(json.dumps(doc, sort_keys=True, default=str))
    else:
        for key in _TEXT_KEYS:
            if key in doc:
                value = doc[key]
                if key == "uptime" and isinstance(value, float):
                    value = f"{value:.0f}s"
                elif key == "activity" and isinstance(value, dict):
                    value = _activity_text(value)
                elif key == "p2p" and isinstance(value, dict):  # LAN peers (§7.11)
                    value = (
                        f"port {value['port']}: {value['bytes_uploaded']} bytes uploaded; "
                        f"{value['last_bytes_from_peers']} from peers in the last download"
                    )
                print(f"{key:17} {value if value is not None else '-'}")
    return code


def _activity_text(a: dict[str, Any]) -> str:
    """``status``'s activity line: the users the app last reported, and a pending update."""
    users = a.get("users")
    # source: "report" (the app's report_activity) or "busy_command".
    text = "not reported" if users is None else f"{users} user(s) (by {a.get('source') or '?'})"
    pending = a.get("pending_update")
    if isinstance(pending, dict) and pending.get("version"):
        text += f"; update to {pending['version']} pending"
    return text


# --- update through the owner ------------------------------------------------------------

#: Deadline of an update request through the owner: download and restart included.
UPDATE_DEADLINE: Final = 3600.0


def update_via_owner(args: argparse.Namespace, config: Any, timeout: float) -> int:
    """``fleetpush update`` carried out by the running owner.

    Raises NoOwner (nothing answers: act directly), ControlError.
    """
    from fleetpush.cli.exitcodes import EXIT_NO_UPDATE, EXIT_USAGE

    if args.check:
        found = ask(config, "check", timeout + 5.0, timeout=timeout)
        print_doc(
            args,
            found,
            f"installed {found['installed']}; newest offered {found['newest'] or '-'}; "
            + ("update available" if found["available"] else f"no update ({found['reason']})"),
        )
        return EXIT_OK if found["available"] else EXIT_NO_UPDATE
    if args.no_start:
        # Probe first: only a running owner makes --no-start meaningless.
        owner = ask(config, "status", STATUS_DEADLINE)
        return fail(
            f"update --no-start: the {owner.get('owner')} (pid {owner.get('owner_pid')}) "
            "runs the app and restarts it after an update [stop it first, or drop --no-start]",
            EXIT_USAGE,
        )
    if args.rollback:
        done = ask(config, "rollback", UPDATE_DEADLINE)
        from fleetpush.client.data_steps import describe_rollback

        print_doc(args, done, describe_rollback(done))
        return EXIT_OK
    result = ask(config, "update", UPDATE_DEADLINE, to=args.to, force=args.force, timeout=timeout)
    return report_update(args, result)


def report_update(args: argparse.Namespace, result: dict[str, Any]) -> int:
    """Print DeviceOps.update's result; its exit code."""
    from fleetpush.cli.exitcodes import EXIT_NO_UPDATE

    if result.get("updated"):
        print_doc(args, result, f"installed {result['installed']}")
        return EXIT_OK
    if result.get("reason") in ("installed", "already installed"):
        print_doc(args, result, "already installed")
        return EXIT_OK if args.to else EXIT_NO_UPDATE
    print_doc(args, result, f"nothing to do: {result.get('reason')}")
    return EXIT_NO_UPDATE


def owner_failure(e: BaseException) -> int | None:
    """One line and the exit code for a ControlError or OwnerBusy; None for others."""
    from fleetpush.client.local import ControlError
    from fleetpush.client.owner import OwnerBusy

    if isinstance(e, ControlError):
        return fail(str(e), e.code)
    if isinstance(e, OwnerBusy):
        return fail(str(e), EXIT_FAILURE)
    return None


__all__ = [
    "ask",
    "fail",
    "owner_failure",
    "print_doc",
    "report_update",
    "status",
    "update_via_owner",
    "with_owner",
]
