"""A push's hand-off to the live links: written at once where it can be (issue 15).

The releaser's share of a push to every connected device used to be a trio
task per device (start, send, wait for the ack: ~150 µs each, specs/SCALE.md
§2). Here the command's params are encoded once for all targets
(:class:`SharedCommand`), and each link whose send side is idle gets the
frame written straight into its socket by the pushing task, its ack
recorded by a callback from the link's reader (net/answers.py): no task per
device. A link busy sending (chunks, a pong) or without room takes the
command through its normal, ordered path (its delivery task, the outbox);
a link with neither leaves the command queued in the database, re-offered
on its next connection (specs/PROTOCOL.md §7.4). Either way the device
persists the command before it acknowledges it (§7.4): nothing changes on
its side.

:func:`fan_out` decides, per target, which of those happens; the writing is
done by the callables it is given, so it knows nothing of sessions or sockets
(like chunks.py's ``send_chunks``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import trio
from fleetpush.protocol import RpcError
from fleetpush.protocol.connection import EncodedParams, encode_params
from fleetpush.protocol.events import ErrorReceived, ResponseReceived
from fleetpush.protocol.messages import Ack, UpdateCommand

from fleetpush.net.peer import PeerClosed

from . import db
from .events import EventHub
from .registry import PushStore

L = TypeVar("L")
#: distinct outcomes a push keeps encoded (its acks: accepted, a few refusals)
MAX_SHARED_RESULTS = 16
Log = logging.Logger | logging.LoggerAdapter[Any]


@attrs.frozen(kw_only=True)
class SharedCommand:
    """One push's command as every one of its targets receives it (§7.4)."""

    push_id: str
    app: str
    version: str
    #: the operator's mode: "apply", "force" or "stage"
    mode: str
    #: ``__apply_update__`` or ``__force_update__``
    method: str
    #: what the device is told (``stage`` sends restart=False: download now, apply later)
    restart: bool
    #: the params without a freshness statement
    plain: UpdateCommand
    #: ``plain``, msgpack-encoded once for every target
    params: EncodedParams
    #: the ``command_result`` payloads by (state, detail), each with its JSON
    #: text: a push's N acks mostly share one ("accepted", ""), so its dict and
    #: JSON are made once, not once per device (issue 15, specs/SCALE.md §2)
    results: dict[tuple[str, str], tuple[dict[str, Any], str]] = attrs.field(
        factory=dict, eq=False, repr=False
    )

    def result_payload(self, state: str, detail: str) -> tuple[dict[str, Any], str]:
        """The ``command_result`` event data for one outcome, and its JSON (shared: read only)."""
        key = (state, detail)
        found = self.results.get(key)
        if found is None:
            data: dict[str, Any] = {
                "push_id": self.push_id,
                "method": self.method,
                "version": self.version,
                "state": state,
                "detail": detail,
            }
            found = (data, db.dumps(data))
            if len(self.results) < MAX_SHARED_RESULTS:
                # Details are the devices' own words (refusal reasons): bounded.
                self.results[key] = found
        return found


def shared_command(push_id: str, app: str, version: str, mode: str, restart: bool) -> SharedCommand:
    """The command a push sends, encoded once."""
    method = "__apply_update__" if mode == "apply" else "__force_update__"
    told = False if mode == "stage" else restart
    plain = UpdateCommand(app=app, version=version, restart=told, push_id=push_id)
    return SharedCommand(
        push_id=push_id,
        app=app,
        version=version,
        mode=mode,
        method=method,
        restart=told,
        plain=plain,
        params=encode_params(plain),
    )


@attrs.frozen
class Fanout:
    """Who got the command (``sent``: written now or handed to the link) and who did not."""

    sent: list[str]
    queued: list[str]
    #: how many of ``sent`` were written straight into their socket
    direct: int


def fan_out(
    targets: Sequence[str],
    online: Mapping[str, L],
    send_now: Callable[[str, L], bool],
    offer: Callable[[str, L], bool],
) -> Fanout:
    """Hand one push to each of ``targets`` that is ``online``, in order.

    ``send_now(device_id, link)`` writes the command at once and says whether
    it could (its send side was idle); otherwise ``offer(device_id, link)``
    hands it to the link's own ordered path, False if the link has no room.
    A target neither took, or not online, is queued (delivered on connect).
    """
    sent: list[str] = []
    queued: list[str] = []
    direct = 0
    for device_id in targets:
        link = online.get(device_id)
        if link is None:
            queued.append(device_id)
        elif send_now(device_id, link):
            direct += 1
            sent.append(device_id)
        elif offer(device_id, link):
            sent.append(device_id)
        else:
            queued.append(device_id)
    return Fanout(sent=sent, queued=queued, direct=direct)


class AckDeps(Protocol):
    """Where an ack is recorded (Services has these attributes)."""

    @property
    def pushes(self) -> PushStore: ...

    @property
    def events(self) -> EventHub: ...


def record_answer(
    deps: AckDeps,
    log: Log,
    device_id: str,
    target_id: int,
    answer: Ack | Exception,
    *,
    push_id: str,
    method: str,
    version: str,
    shared: SharedCommand | None = None,
) -> None:
    """Record a device's ack of a command (or why there is none) in its push target.

    ``shared``: the push's command when it went to many links at once; its
    outcome payloads are then encoded once for all of them.
    """
    if isinstance(answer, PeerClosed):
        return  # still 'sent': delivered again on the next connection (§7.4)
    if isinstance(answer, RpcError):
        state, detail = "error", f"[{answer.code}] {answer.message}"
    elif isinstance(answer, trio.TooSlowError):
        state, detail = "timeout", "no acknowledgement in time"
    elif isinstance(answer, Ack):
        state, detail = ("accepted", "") if answer.accepted else ("refused", answer.reason)
    else:
        raise answer  # not an outcome of a request: a bug, logged by the caller
    if state == "accepted":
        # The common outcome of a push to N devices: one line each at debug;
        # the push's own line (push_core.py) and its events say it at info.
        log.debug("%s %s: %s", method, version, state)
    else:
        log.info("%s %s: %s %s", method, version, state, detail)
    deps.pushes.mark(target_id, state, detail, time.time())
    # Per device, not one summary per push: the deployment scheduler
    # (rollout.py observe), watchers and tests follow each device's answer
    # (specs/PROTOCOL.md §7.7). Made cheap instead: a shared payload and JSON.
    if shared is not None:
        data, encoded = shared.result_payload(state, detail)
        deps.events.emit("command_result", device_id, data, encoded=encoded)
        return
    deps.events.emit(
        "command_result",
        device_id,
        {
            "push_id": push_id,
            "method": method,
            "version": version,
            "state": state,
            "detail": detail,
        },
    )


@attrs.define
class AckRecorder:
    """The callback of one command written by Peer.request_nowait: records its outcome.

    One small object per device until its ack (not a closure and its cells).
    """

    deps: AckDeps
    log: Log
    device_id: str
    target_id: int
    command: SharedCommand

    def __call__(self, outcome: ResponseReceived | ErrorReceived | Exception) -> None:
        answer: Any = outcome
        if isinstance(outcome, ResponseReceived):
            answer = outcome.result
        elif isinstance(outcome, ErrorReceived):
            answer = RpcError(outcome.code, outcome.message, outcome.data)
        command = self.command
        record_answer(
            self.deps,
            self.log,
            self.device_id,
            self.target_id,
            answer,
            push_id=command.push_id,
            method=command.method,
            version=command.version,
            shared=command,
        )
