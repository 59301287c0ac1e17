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

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import attrs
from fleetpush.protocol.connection import EncodedParams, encode_params
from fleetpush.protocol.messages import UpdateCommand

L = TypeVar("L")


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
