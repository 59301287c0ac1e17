"""The operator's view of peer delivery: ``p2p_view`` (specs/PROTOCOL.md §7.11, issue 18).

What an operator needs to judge LAN delivery: which devices were reported
for serving a chunk that failed its digest (by whom, when, for which
release), and how a release arrived: the bytes devices reported from peers
and from the releaser (their ``p2p_bytes`` notifications), summed over a
release or over one deployment's devices. ``fleetpush devices``,
``devices show``, ``deploy show`` and ``watch`` read it.

Registered in :data:`~fleetpush.protocol.messages.METHODS` at import, like
p2p.py, so messages.py (near its size limit) stays as it is.
"""

from __future__ import annotations

from typing import Final

from attrs import field, frozen
from attrs.validators import deep_iterable, instance_of, max_len, optional

from .limits import MAX_WIRE_INT
from .messages import METHODS, Kind, MethodSpec
from .validators import int_range

#: Most bad-peer reports one answer carries (the newest; reports are rare).
MAX_REPORTS: Final = 1000


@frozen(kw_only=True)
class P2PQuery:
    """``p2p_view`` params: all fields narrow the answer; none given: the whole fleet."""

    app: str | None = field(default=None, validator=optional(max_len(128)))
    version: str | None = field(default=None, validator=optional(max_len(128)))
    #: sum the bytes over this deployment's devices only (its app and version).
    deployment_id: str | None = field(default=None, validator=optional(max_len(64)))
    device_id: str | None = field(default=None, validator=optional(max_len(128)))


@frozen(kw_only=True)
class BadPeerReport:
    """One device reported by another for a chunk that failed its digest (or a refusal)."""

    device_id: str = field(validator=max_len(128))
    app: str = field(validator=max_len(128))
    version: str = field(validator=max_len(128))
    reporter: str = field(validator=max_len(128))
    reason: str = field(validator=max_len(32))
    at: float


@frozen(kw_only=True)
class P2PView:
    reports: list[BadPeerReport] = field(
        factory=list,
        validator=[max_len(MAX_REPORTS), deep_iterable(instance_of(BadPeerReport))],
    )
    #: bytes the matching devices reported from peers / from the releaser.
    from_peers: int = field(default=0, validator=int_range(0, MAX_WIRE_INT))
    from_releaser: int = field(default=0, validator=int_range(0, MAX_WIRE_INT))
    #: how many (device, release) downloads those sums cover.
    downloads: int = field(default=0, validator=int_range(0, MAX_WIRE_INT))


METHODS["p2p_view"] = MethodSpec("p2p_view", Kind.REQUEST, P2PQuery, P2PView, "operator")

__all__ = ["MAX_REPORTS", "BadPeerReport", "P2PQuery", "P2PView"]
