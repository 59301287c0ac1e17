"""The tracker's device methods: ``get_peers`` and ``report_peer`` (§7.11, issue 18).

Handlers in the shape of device_api.py: services and the call in, a result
out. The choice of peers is pure (``select_peers``); the token is signed with
the releaser's timestamp key, which devices already verify (§8.6), so a
releaser without one hands out no peers and every device fetches from it.
"""

from __future__ import annotations

import functools
import time
from typing import Final

from fleetpush.protocol.messages import Empty
from fleetpush.protocol.p2p import (
    DEFAULT_PEERS,
    REPORT_REASONS,
    GetPeers,
    PeerAddr,
    PeerBytes,
    PeerList,
    PeerToken,
    ReportPeer,
    sign_peer_token,
)
from fleetpush.protocol.p2p_policy import Candidate, select_peers
from fleetpush.protocol.p2p_view import P2PQuery, P2PView

from . import db
from .call import Call
from .errors import BadRequest
from .p2p_tracker import PeerTracker
from .registry import DeviceRegistry
from .services import Services

#: How long a peer token lives: one release download, with room for retries.
TOKEN_LIFE: Final = 900


def _holds(devices: DeviceRegistry, device_id: str, app: str, version: str) -> bool:
    row = devices.get(device_id)
    return (
        row is not None and row["app"] == app and version in (row["version"], row["staged_version"])
    )


def _announce(
    devices: DeviceRegistry,
    tracker: PeerTracker,
    me: str,
    p: GetPeers,
    public_addr: str,
) -> tuple[db.Row | None, Candidate, list[Candidate]]:
    """The database part of ``get_peers`` before the fleet filter (a worker thread:
    db_calls.py): the asker's row and announcement, and who serves the app."""
    row = devices.get(me)
    asker = Candidate(
        device_id=me,
        public_addr=public_addr,
        subnet=p.subnet,
        site=None if row is None else row["grp"],
    )
    tracker.announce(
        me,
        app=p.app,
        public_addr=asker.public_addr,
        subnet=p.subnet,
        site=asker.site,
        host=p.host,
        port=p.port,
        now=time.time(),
    )
    return row, asker, tracker.serving(p.app)


def _holders(
    devices: DeviceRegistry, tracker: PeerTracker, live: list[Candidate], p: GetPeers
) -> tuple[list[Candidate], frozenset[str]]:
    """Of the connected candidates, those holding the release; and the reported ones."""
    holders = [c for c in live if _holds(devices, c.device_id, p.app, p.version)]
    return holders, tracker.bad(p.app, p.version)


async def get_peers(services: Services, call: Call, p: GetPeers) -> PeerList:
    """Up to N near peers holding the release, with a token naming them.

    The tracker's queries run off the trio thread on PostgreSQL (db_calls.py);
    the fleet (who is connected) is read here, on the trio thread.
    Raises :class:`BadRequest` (a port without a reported LAN address is fine;
    an app that is not the hello's is refused like check_update).
    """
    if call.caller.app != p.app:
        raise BadRequest(f"get_peers: this connection is for {call.caller.app}, not {p.app}")
    me = call.device_id
    tracker = services.p2p
    now = time.time()
    row, asker, serving = await services.calls.run(
        _announce, services.devices, tracker, me, p, services.fleet.address(me)
    )
    signer = services.freshness
    if signer is None or row is None:
        return PeerList()
    live = [c for c in serving if c.device_id in services.fleet]
    holders, bad = await services.calls.run(_holders, services.devices, tracker, live, p)
    chosen = select_peers(asker, holders, bad=bad, n=DEFAULT_PEERS)
    if not chosen:
        return PeerList()
    token = PeerToken(
        server_id=services.server_id,
        issued=int(now),
        expires=int(now) + TOKEN_LIFE,
        asker=me,
        asker_key=bytes(row["public_key"]),
        app=p.app,
        version=p.version,
        peers=[c.device_id for c in chosen],
    )
    return PeerList(
        peers=[PeerAddr(device_id=c.device_id, host=c.host, port=c.port) for c in chosen],
        token=sign_peer_token(token, [signer.key]),
    )


def p2p_bytes(services: Services, call: Call, p: PeerBytes) -> None:
    """A device's bytes from peers vs from the releaser: metrics and an event (watch)."""
    services.metrics.delivered_bytes.labels("peers").inc(p.from_peers)
    services.metrics.delivered_bytes.labels("releaser").inc(p.from_releaser)
    services.p2p.delivered(
        call.device_id,
        app=p.app,
        version=p.version,
        from_peers=p.from_peers,
        from_releaser=p.from_releaser,
        now=time.time(),
    )
    services.events.emit(
        "p2p_delivery",
        call.device_id,
        {
            "app": p.app,
            "version": p.version,
            "from_peers": p.from_peers,
            "from_releaser": p.from_releaser,
        },
    )


async def report_peer(services: Services, call: Call, p: ReportPeer) -> Empty:
    """Record a lying peer: never handed out for this release again, and an event.

    The row is written off the trio thread on PostgreSQL (db_calls.py).
    """
    if p.reason not in REPORT_REASONS:
        raise BadRequest(f"report_peer: reason must be one of {', '.join(REPORT_REASONS)}")
    first = await services.calls.run(
        functools.partial(
            services.p2p.report,
            p.peer_id,
            app=p.app,
            version=p.version,
            reporter=call.device_id,
            reason=p.reason,
            now=time.time(),
        )
    )
    if first:
        services.events.emit(
            "bad_peer",
            p.peer_id,
            {"app": p.app, "version": p.version, "reporter": call.device_id, "reason": p.reason},
        )
    return Empty()


def p2p_view(services: Services, call: Call, q: P2PQuery) -> P2PView:
    """The operator view of peer delivery (§7.11): bad-peer reports and byte sums."""
    return services.p2p.view(q)


__all__ = ["TOKEN_LIFE", "get_peers", "p2p_bytes", "p2p_view", "report_peer"]
