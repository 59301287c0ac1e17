"""Peer-to-peer decisions with no I/O: who is near, and where each chunk comes from.

Two pure pieces of §7.11, kept apart from the code that acts on them:

* :func:`select_peers` is the tracker's choice (the releaser): up to N online
  devices holding the release that are near the asker, never a reported bad
  peer.
* :class:`FetchPolicy` is the device's fetch policy: chunks go to peers first,
  spread across them; the releaser is the fallback for chunks no peer can
  serve or whose per-chunk deadline passed (~4 s per MiB, as Kraken uses); a
  peer that sent one chunk failing its digest is dropped for the rest of the
  release and reported; a peer that misses deadlines is replaced (dropped
  without blame). Time is passed in (aioquic style), so tests need no sleeps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable
from typing import Final

from attrs import define, field, frozen

#: The releaser's name in a :class:`FetchPolicy` plan.
RELEASER: Final = ""
#: Per-chunk deadline on a peer link: seconds per MiB, and the floor (§7.11).
SECONDS_PER_MIB: Final = 4.0
MIN_DEADLINE: Final = 2.0
#: Deadlines a peer may miss before it is replaced.
MAX_MISSES: Final = 2


@frozen(kw_only=True)
class Candidate:
    """A device as the tracker sees it."""

    device_id: str
    #: the public address the releaser sees this device connect from.
    public_addr: str
    #: the LAN the device reported (``get_peers.subnet``), or None.
    subnet: str | None = None
    #: the operator-set site (group), or None.
    site: str | None = None
    online: bool = True
    #: where it serves (0: it does not serve).
    host: str = ""
    port: int = 0


def nearness(asker: Candidate, other: Candidate) -> int:
    """2: same LAN (public address and reported subnet); 1: same site; 0: not near."""
    if (
        asker.subnet is not None
        and other.subnet == asker.subnet
        and other.public_addr == asker.public_addr
    ):
        return 2
    if asker.site is not None and other.site == asker.site:
        return 1
    return 0


def select_peers(
    asker: Candidate,
    holders: Iterable[Candidate],
    *,
    bad: frozenset[str] = frozenset(),
    n: int = 4,
) -> list[Candidate]:
    """The tracker's answer (§7.11): up to ``n`` near, online, serving holders.

    Same-LAN peers, when there are any, are the only ones handed out;
    otherwise same-site ones. Within a rank the order is a
    hash of (asker, peer): stable for one asker, different across askers, so
    load spreads over the holders without randomness in the protocol core.
    """

    def spread(c: Candidate) -> bytes:
        return hashlib.sha256(f"{asker.device_id}\x00{c.device_id}".encode()).digest()

    ranked = [
        (nearness(asker, c), c)
        for c in holders
        if c.online and c.port and c.device_id != asker.device_id and c.device_id not in bad
    ]
    ranked = [(r, c) for r, c in ranked if r > 0]
    # Same-LAN holders exist: hand out only them. A same-group peer with
    # another public address may sit behind another NAT, announcing a LAN
    # address this asker cannot reach (§7.11; tests/netns/test_p2p_sites.py).
    if any(r == 2 for r, _ in ranked):
        ranked = [(r, c) for r, c in ranked if r == 2]
    ranked.sort(key=lambda rc: (-rc[0], spread(rc[1])))
    return [c for _, c in ranked[: max(0, n)]]


def chunk_deadline(size: int) -> float:
    """Seconds a peer has to deliver one chunk of ``size`` bytes."""
    return max(MIN_DEADLINE, SECONDS_PER_MIB * size / (1 << 20))


@frozen
class Dropped:
    """A peer left the plan: ``reason`` is "corrupt" (report it), "slow" or "gone"."""

    peer: str
    reason: str


@define
class _Pending:
    source: str
    deadline: float


@define
class FetchPolicy:
    """Which source each outstanding chunk is asked from (§7.11).

    ``chunks`` maps a chunk key (e.g. ``(file_index, chunk_index)``) to its
    size. Call :meth:`assign` for the next requests to send per source,
    then report what happened with :meth:`received`, :meth:`corrupt`,
    :meth:`gone` and :meth:`expire`. Chunks taken from a peer go back to the
    pool, where they are given to another peer or to the releaser.
    """

    chunks: dict[Hashable, int]
    peers: list[str]
    pending: dict[Hashable, _Pending] = field(factory=dict)
    #: chunks a peer failed to deliver go to the releaser (no second peer try).
    to_releaser: set[Hashable] = field(factory=set)
    done: set[Hashable] = field(factory=set)
    dropped: dict[str, str] = field(factory=dict)
    misses: dict[str, int] = field(factory=dict)
    bytes_from_peers: int = 0
    bytes_from_releaser: int = 0
    _turn: int = 0

    @property
    def live_peers(self) -> list[str]:
        return [p for p in self.peers if p not in self.dropped]

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.chunks)

    def assign(self, now: float, *, per_peer: int = 8) -> dict[str, list[Hashable]]:
        """Spread unrequested chunks round-robin over live peers, at most
        ``per_peer`` outstanding each; the rest (when no peer is left, or the
        chunk already failed on a peer) go to the releaser (:data:`RELEASER`)."""
        plan: dict[str, list[Hashable]] = {}
        live = self.live_peers
        load = {p: 0 for p in live}
        for job in self.pending.values():
            if job.source in load:
                load[job.source] += 1
        for key, size in self.chunks.items():
            if key in self.done or key in self.pending:
                continue
            source = RELEASER
            if live and key not in self.to_releaser:
                for i in range(len(live)):
                    p = live[(self._turn + i) % len(live)]
                    if load[p] < per_peer:
                        source = p
                        self._turn = (self._turn + i + 1) % len(live)
                        load[p] += 1
                        break
                else:
                    continue  # every peer is busy: wait for one rather than load the releaser
            deadline = now + chunk_deadline(size) if source != RELEASER else float("inf")
            self.pending[key] = _Pending(source, deadline)
            plan.setdefault(source, []).append(key)
        return plan

    def received(self, key: Hashable, source: str) -> None:
        """A chunk arrived and matched its manifest digest."""
        # A chunk asked of a peer and, after its deadline, of the releaser may
        # arrive twice: the first verified copy counts, the second is moot.
        self.pending.pop(key, None)
        if key in self.done:
            return
        self.done.add(key)
        size = self.chunks[key]
        if source == RELEASER:
            self.bytes_from_releaser += size
        else:
            self.bytes_from_peers += size
            self.misses[source] = 0

    def corrupt(self, key: Hashable, peer: str) -> Dropped:
        """A chunk from ``peer`` failed its digest: drop it for the release."""
        self.to_releaser.add(key)
        return self._drop(peer, "corrupt")

    def gone(self, peer: str) -> Dropped:
        """The link to ``peer`` failed or it refused: its chunks go back to the pool."""
        return self._drop(peer, "gone")

    def expire(self, now: float) -> list[Dropped]:
        """Move chunks whose deadline passed to the releaser; replace peers
        that missed :data:`MAX_MISSES` deadlines."""
        out: list[Dropped] = []
        late = [k for k, j in self.pending.items() if j.deadline <= now]
        for key in late:
            job = self.pending.pop(key)
            self.to_releaser.add(key)
            self.misses[job.source] = self.misses.get(job.source, 0) + 1
            if self.misses[job.source] >= MAX_MISSES and job.source not in self.dropped:
                out.append(self._drop(job.source, "slow"))
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has work (for the caller's timer)."""
        times = [j.deadline for j in self.pending.values() if j.source != RELEASER]
        return min(times) if times else None

    def _drop(self, peer: str, reason: str) -> Dropped:
        self.dropped.setdefault(peer, reason)
        for key in [k for k, j in self.pending.items() if j.source == peer]:
            del self.pending[key]
        return Dropped(peer, self.dropped[peer])


__all__ = [
    "MAX_MISSES",
    "MIN_DEADLINE",
    "RELEASER",
    "SECONDS_PER_MIB",
    "Candidate",
    "Dropped",
    "FetchPolicy",
    "chunk_deadline",
    "nearness",
    "select_peers",
]
