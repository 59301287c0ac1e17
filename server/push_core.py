"""The one path by which the releaser pushes a release to devices (specs/PROTOCOL.md §7.4).

Both the operator's ``push`` (operator_api.py) and a deployment starting its
devices (rollout.py) go through :func:`deliver_push`, so a deployment's
start is an ordinary push: recorded in ``pushes``/``push_targets``, handed to
live links at once, re-offered on each connection until finished, and
superseded by a newer push like any other. It takes the stores and links it
needs (:class:`PushDeps`), not the releaser's Services, so it imports no
handler module and no session.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any, Protocol

from fleetpush.protocol.messages import PushResult

from . import gc_policy
from .events import EventHub
from .fleet import DeviceLink, Fleet
from .metrics import Metrics
from .push_fanout import fan_out, shared_command
from .registry import PendingCommand, PushStore

log = logging.getLogger("fleetpush.server")


class PushDeps(Protocol):
    """What a push needs of the releaser (Services has these attributes)."""

    @property
    def pushes(self) -> PushStore: ...

    @property
    def fleet(self) -> Fleet: ...

    @property
    def events(self) -> EventHub: ...

    @property
    def metrics(self) -> Metrics: ...


def deliver_push(
    deps: PushDeps,
    *,
    operator: str,
    app: str,
    version: str,
    mode: str,
    restart: bool,
    selector: dict[str, Any],
    targets: list[str],
    now: float,
    extra: dict[str, Any] | None = None,
    announce: Callable[[str], None] | None = None,
) -> PushResult:
    """Record a push of (``app``, ``version``) to ``targets`` and hand it to those online.

    The caller has checked the release is pushable and the targets are
    accepted devices of ``app``. ``extra`` is added to the ``push`` event
    (a deployment names itself). ``announce(push_id)``, if given, is told
    the push once its rows are committed, before the fan-out here (the
    cluster bus: other releasers' devices need not wait for ours).
    Raises :class:`~.db.DatabaseError`.
    """
    with gc_policy.paused():  # no await inside: a synchronous fan-out
        return _deliver_push(
            deps,
            operator=operator,
            app=app,
            version=version,
            mode=mode,
            restart=restart,
            selector=selector,
            targets=targets,
            now=now,
            extra=extra,
            announce=announce,
        )


def _deliver_push(
    deps: PushDeps,
    *,
    operator: str,
    app: str,
    version: str,
    mode: str,
    restart: bool,
    selector: dict[str, Any],
    targets: list[str],
    now: float,
    extra: dict[str, Any] | None,
    announce: Callable[[str], None] | None,
) -> PushResult:
    push_id = secrets.token_hex(8)
    # Decided before the transaction and handed over right after it, with no
    # await in between: a link seen here with room in its outbox still has
    # it below, so every target recorded 'sent' is really handed over.
    online: dict[str, DeviceLink] = {}
    for device_id in targets:
        live = deps.fleet.get(device_id)
        if live is not None and live.can_take_commands and live.has_room:
            online[device_id] = live
    deps.metrics.pushes_created.inc()
    ids = deps.pushes.create(
        push_id=push_id,
        operator=operator,
        app=app,
        version=version,
        mode=mode,
        restart=restart,
        selector=selector,
        targets=targets,
        sent=online.keys(),
        now=now,
    )
    if announce is not None:
        announce(push_id)
    # Encoded once, written straight to each idle link (push_fanout.py, issue 15).
    command = shared_command(push_id, app, version, mode, restart)

    def offer(device_id: str, live: DeviceLink) -> bool:
        return live.offer_command(
            PendingCommand(
                target_id=ids[device_id],
                push_id=push_id,
                app=app,
                version=version,
                mode=mode,
                restart=restart,
            )
        )

    fan = fan_out(
        targets,
        online,
        lambda device_id, live: live.send_command_now(ids[device_id], command),
        offer,
    )
    sent, queued = fan.sent, fan.queued
    log.info(
        "push %s: %s %s %s to %d device(s), %d online (%d written at once)",
        push_id,
        mode,
        app,
        version,
        len(targets),
        len(sent),
        fan.direct,
    )
    deps.events.emit(
        "push",
        None,
        {
            "push_id": push_id,
            "app": app,
            "version": version,
            "mode": mode,
            "restart": restart,
            "targets": len(targets),
            "sent": len(sent),
            "queued": len(queued),
            "operator": operator,
            **(extra or {}),
        },
    )
    return PushResult(push_id=push_id, targets=targets, sent=sent, queued=queued)
