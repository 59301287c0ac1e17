"""Peer delivery in the operator's views (issue 18, specs/PROTOCOL.md §7.11).

``fleetpush devices`` marks devices reported as bad peers, ``devices show``
lists the reports (by whom, when, for which release), ``deploy show`` sums
the bytes the deployment's devices got from peers and from the releaser,
and ``watch`` folds the ``p2p_delivery`` events it sees into the same split.
All of it comes from one operator request, ``p2p_view``.
"""

from __future__ import annotations

import time
from typing import Any

from fleetpush.operator import MethodUnknown, OperatorClient
from fleetpush.protocol.p2p_view import P2PQuery, P2PView

from .output import human_size


async def fetch(op: OperatorClient, **query: str | None) -> P2PView | None:
    """The releaser's ``p2p_view`` for ``query``, or None from a releaser older than it.

    A newer console against an older releaser still lists devices and shows
    deployments; only the peer figures are missing, and say so. Otherwise
    raises what ``OperatorClient.call`` raises.
    """
    try:
        view: P2PView = await op.call("p2p_view", P2PQuery(**query))
    except MethodUnknown:
        return None
    return view


def bad_counts(view: P2PView | None) -> dict[str, int]:
    """Device id -> reports against it (any release)."""
    counts: dict[str, int] = {}
    for r in view.reports if view else []:
        counts[r.device_id] = counts.get(r.device_id, 0) + 1
    return counts


def report_lines(view: P2PView | None, device_id: str) -> list[str]:
    """``devices show``: one line per report against ``device_id``, newest first."""
    return [
        f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.at))}  reported by "
        f"{r.reporter} for {r.app} {r.version}: {r.reason}"
        for r in (view.reports if view else [])
        if r.device_id == device_id
    ]


def reports_json(view: P2PView | None, device_id: str) -> list[dict[str, Any]] | None:
    return [
        {"reporter": r.reporter, "app": r.app, "version": r.version, "reason": r.reason,
         "at": round(r.at, 3)}
        for r in view.reports
        if r.device_id == device_id
    ] if view else None  # fmt: skip


def delivery_json(view: P2PView | None) -> dict[str, int] | None:
    """The byte split as ``deploy show --json`` carries it (plain ints; None: not known)."""
    if view is None:
        return None
    return {
        "from_peers": view.from_peers,
        "from_releaser": view.from_releaser,
        "devices_reported": view.downloads,
    }


def delivery_text(from_peers: int, from_releaser: int, downloads: int) -> str:
    """``1.5 GiB from peers (97%), 48.0 MiB from the releaser; 48 devices reported``."""
    total = from_peers + from_releaser
    if not downloads:
        return "no device reported its download yet"
    share = f" ({100 * from_peers / total:.0f}%)" if total else ""
    return (
        f"{human_size(from_peers)} from peers{share}, {human_size(from_releaser)} from the "
        f"releaser; {downloads} device{'s' if downloads != 1 else ''} reported"
    )


__all__ = [
    "bad_counts",
    "delivery_json",
    "delivery_text",
    "fetch",
    "report_lines",
    "reports_json",
]
