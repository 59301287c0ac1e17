"""What the owner of a device does for a local request: status, check, update,
rollback, apply-staged, confirm, activity and the supervised app (issue 11).

The same :class:`DeviceOps` answers the control socket (control.py) of a
running agent or embedded updater, and acts for a device command when no
owner runs (``fleetpush update`` then holds the owner lock itself), so the
rules are one: ``update --to`` refuses a release marked bad on this device or
not offered to its channel unless forced, a rollback or an apply under an
agent happens between stopping and starting its child, and ``status`` reads
and never changes anything, nor asks the releaser.

It is given the updater as a :class:`Device` (its public operations) and the
agent as an :class:`AppControl`, never imports either (STYLE.md §8).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import trio
from fleetpush.protocol.errors import ErrorCode, FleetpushError, RpcError, VersionError
from fleetpush.protocol.messages import GetManifest, GetManifestResult
from fleetpush.protocol.versions import canonical_version

from . import install
from .activity import ActivityBoard
from .config import ConfigError, UpdaterConfig
from .context import UpdateContext
from .control import ControlServer, Handler
from .data_steps import rollback_fields
from .errors import UpdateRefused
from .health import health_fields
from .hosts import Host
from .layout import StateLayout
from .local import (
    CODE_AUTH,
    CODE_CONFLICT,
    CODE_FAILURE,
    CODE_NO_UPDATE,
    CODE_NOT_FOUND,
    CODE_UNREACHABLE,
    CODE_USAGE,
    ControlError,
)
from .owner import OwnerBusy
from .reporting import result_doc
from .schema import describe_record
from .session import ReleaserLink, Unreachable
from .update_check import UpdateInfo

T = TypeVar("T")

log = logging.getLogger("fleetpush.client.control")

#: Release statuses each channel is offered (the releaser's check_update rule,
#: specs/PROTOCOL.md §7.7); ``update --to`` keeps to it unless forced.
CHANNEL_OFFERS: Final = {"stable": ("approved",), "beta": ("approved", "pre-released")}

#: A deferred restart of an embedded app: long enough for the answer to leave.
ANSWER_GRACE: Final = 0.2


class Device(Protocol):
    """The updater's public operations, as :class:`DeviceOps` uses them."""

    @property
    def config(self) -> UpdaterConfig: ...
    @property
    def ctx(self) -> UpdateContext: ...
    @property
    def host(self) -> Host: ...
    @property
    def session(self) -> ReleaserLink: ...

    def status(self) -> dict[str, Any]: ...

    async def check(self, *, timeout: float | None = None) -> UpdateInfo: ...

    async def update(
        self,
        version: str | None = None,
        *,
        push_id: str = "",
        forced: bool = False,
        restart: bool | None = None,
        timeout: float | None = None,
    ) -> UpdateInfo: ...

    async def apply(
        self, version: str, *, push_id: str = "", forced: bool | None = None
    ) -> None: ...

    def confirm(self) -> None: ...


class AppControl(Protocol):
    """The agent's supervision of its app child."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def restart(self) -> None: ...

    async def while_stopped(self, work: Callable[[], Awaitable[T]]) -> T:
        """Stop the child, run ``work``, start the child again (also if it raised)."""
        ...

    def describe(self) -> dict[str, Any]:
        """``app_state``, ``pid``, ``uptime``... of the child (JSON-able)."""
        ...


def error_code(e: BaseException) -> int:
    """The exit code (README) for a failure of a device operation."""
    if isinstance(e, ControlError):
        return e.code
    if isinstance(e, ConfigError):
        return CODE_USAGE
    if isinstance(e, Unreachable | trio.TooSlowError):
        return CODE_UNREACHABLE
    if isinstance(e, RpcError):
        if e.code == ErrorCode.NOT_FOUND:
            return CODE_NOT_FOUND
        if e.code in (ErrorCode.AUTH_FAILED, ErrorCode.PENDING, ErrorCode.REJECTED):
            return CODE_AUTH
        if e.code in (ErrorCode.FORBIDDEN, ErrorCode.UNAVAILABLE, ErrorCode.CONFLICT):
            return CODE_CONFLICT
    if isinstance(e, UpdateRefused):
        return CODE_NO_UPDATE
    if isinstance(e, OwnerBusy):
        return CODE_FAILURE
    return CODE_FAILURE


def _timeout(args: dict[str, Any], default: float) -> float:
    value = args.get("timeout")
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ControlError(f"timeout must be a positive number, got {value!r}", CODE_USAGE)
    return float(value)


class DeviceOps:
    """The local operations of one device (see the module docstring)."""

    def __init__(
        self,
        device: Device,
        *,
        app: AppControl | None = None,
        socket: Path | None = None,
        activity: ActivityBoard | None = None,
    ) -> None:
        self.device = device
        self.app = app
        #: the control socket served, if any (shown in status).
        self.socket = socket
        #: the app's activity reports and the pending update (activity.py).
        self.activity = activity or ActivityBoard()

    def handlers(self) -> dict[str, Handler]:
        return {
            "status": self.status,
            "check": self.check,
            "update": self.update,
            "rollback": self.rollback,
            "apply-staged": self.apply_staged,
            "confirm": self.confirm,
            "report_activity": self.activity.on_report,
            "update_pending": self.activity.on_pending,
            "app": self.app_action,
        }

    # --- reading ----------------------------------------------------------------------

    async def status(self, _args: dict[str, Any]) -> dict[str, Any]:
        """What the owner knows: reads only (no file written, no releaser asked)."""
        d = self.device
        doc = d.status()
        doc.update(
            owner_pid=os.getpid(),
            owner="agent" if self.app is not None else "embedded",
            control_socket=str(self.socket) if self.socket else None,
            connects=d.session.connects,
            last_result=result_doc(d.ctx.store.state.last_result),
            activity=self.activity.describe(),
            root_version=d.ctx.roots.version,
            data_schema=describe_record(StateLayout.of(d.ctx.config.state_dir)),
        )
        if self.app is not None:
            doc.update(self.app.describe())
        doc.update(health_fields(doc))  # the /health fields too (client/health.py)
        return doc

    async def status_doc(self) -> dict[str, Any]:
        """:meth:`status` for the health endpoint."""
        return await self.status({})

    async def check(self, args: dict[str, Any]) -> dict[str, Any]:
        """Ask the releaser on the owner's own session.

        Raises Unreachable, RpcError, TrustError.
        """
        d = self.device
        info = await d.check(timeout=_timeout(args, d.config.check_timeout))
        return {
            "installed": info.installed,
            "newest": info.offered,
            "available": info.available,
            "reason": info.reason,
        }

    # --- changing ---------------------------------------------------------------------

    async def _refusal(self, version: str, timeout: float) -> str | None:
        """Why ``version`` should not be installed without --force, or None.

        Raises Unreachable, RpcError (the releaser refused the manifest).
        """
        d = self.device
        s = d.ctx.store.reload()
        if s.is_bad(version):
            return "it is marked bad on this device (it failed here before)"
        result = await d.session.request(
            "get_manifest", GetManifest(app=d.config.app, version=version), timeout
        )
        assert isinstance(result, GetManifestResult)
        offered = CHANNEL_OFFERS.get(d.config.channel, CHANNEL_OFFERS["stable"])
        if result.status not in offered:
            return f"it is {result.status}, not offered to the {d.config.channel} channel"
        return None

    async def update(self, args: dict[str, Any]) -> dict[str, Any]:
        """Install the newest offer, or ``to``; applied at once (the agent restarts its app).

        Raises ControlError (code 6: refused without ``force``), and what
        the updater raises (Unreachable, RpcError, TrustError, UpdaterError).
        """
        d = self.device
        timeout = _timeout(args, d.config.check_timeout)
        to = args.get("to")
        if to is not None:
            try:
                to = canonical_version(str(to))
            except VersionError as e:
                raise ControlError(f"--to {args.get('to')!r}: {e}", CODE_USAGE) from e
            why = (
                None
                if to == d.ctx.store.state.installed_version
                else (await self._refusal(to, timeout))
            )
            if why is not None and not args.get("force"):
                raise ControlError(
                    f"update --to {to}: refused: {why} [add --force to install it anyway]",
                    CODE_CONFLICT,
                )
        before = d.ctx.store.state.installed_version
        try:
            info = await d.update(to, restart=True, forced=to is not None, timeout=timeout)
        except UpdateRefused as e:
            return {"installed": before, "updated": False, "reason": str(e)}
        s = d.ctx.store.reload()
        updated = s.installed_version != before
        return {
            "installed": s.installed_version,
            "updated": updated,
            "reason": "" if updated else (info.reason or "already installed"),
        }

    def _restart_embedded_later(self) -> None:
        """An embedded owner restarts itself (execv): after its answer has left."""
        d = self.device

        async def later() -> None:
            await trio.sleep(ANSWER_GRACE)
            await d.host.restart_after_rollback(d.ctx)

        d.ctx.spawner.start_soon(later)

    async def rollback(self, _args: dict[str, Any]) -> dict[str, Any]:
        """Restore the previous version (its backup); under an agent, with the app stopped.

        Raises RollbackError (no usable backup), StateError.
        """
        d = self.device
        cfg = d.config

        async def work() -> install.RollbackResult:
            return await trio.to_thread.run_sync(
                partial(install.rollback, cfg.state_dir, cfg.app_root, "rolled back by hand")
            )

        if self.app is not None:
            result = await self.app.while_stopped(work)
        else:
            result = await work()
            if not d.host.supervises:
                self._restart_embedded_later()
        d.ctx.store.reload()
        return {
            "rolled_back": result.failed_version,
            "installed": result.version,
            **rollback_fields(result.data_restored),  # issue 12: was the data restored?
        }

    async def apply_staged(self, _args: dict[str, Any]) -> dict[str, Any]:
        """Apply the staged update now. Raises ControlError (nothing staged), UpdaterError."""
        d = self.device
        s = d.ctx.store.reload()
        if s.staged is None:
            raise ControlError("nothing is staged", CODE_NO_UPDATE)
        version = s.staged.version
        if d.host.supervises:
            await d.apply(version, forced=True)
            return {"applied": version, "installed": d.ctx.store.reload().installed_version}
        d.ctx.spawner.start_soon(partial(self._apply_later, version))
        return {"applying": version}

    async def _apply_later(self, version: str) -> None:
        await trio.sleep(ANSWER_GRACE)
        try:
            await self.device.apply(version, forced=True)
        except FleetpushError as e:  # reported by the host; never raised into the nursery
            log.warning("apply-staged %s: %s", version, e)

    async def confirm(self, _args: dict[str, Any]) -> dict[str, Any]:
        trial = self.device.ctx.store.state.trial
        self.device.confirm()
        return {"confirmed": trial.version if trial else None}

    async def app_action(self, args: dict[str, Any]) -> dict[str, Any]:
        """start / stop / restart the agent's app child. Raises ControlError."""
        if self.app is None:
            raise ControlError(
                "this device's owner is an embedded updater, not an agent: it supervises no app",
                CODE_CONFLICT,
            )
        action = args.get("action")
        actions = {"start": self.app.start, "stop": self.app.stop, "restart": self.app.restart}
        if action not in actions:
            raise ControlError(f"app: unknown action {action!r} (start, stop, restart)", CODE_USAGE)
        await actions[action]()
        return self.app.describe()


async def serve_control(
    device: Device,
    app: AppControl | None,
    activity: ActivityBoard | None = None,
    *,
    task_status: trio.TaskStatus[DeviceOps] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``device``'s operations on its state dir's control socket until cancelled."""
    path = device.ctx.layout.control_socket
    ops = DeviceOps(device, app=app, socket=path, activity=activity)
    server = ControlServer(path, ops.handlers(), error_code)

    async with trio.open_nursery() as nursery:
        ops.socket = await nursery.start(server.serve)
        task_status.started(ops)


__all__ = ["CHANNEL_OFFERS", "AppControl", "Device", "DeviceOps", "error_code", "serve_control"]
