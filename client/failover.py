"""Which releaser to try next, and how long to wait: the device's failover choice.

Pure decisions for :class:`~fleetpush.client.session.ReleaserLink` (issue 15,
§2): given the configured addresses, the one that last worked, the round number
and a random source passed in, say what to dial and how long to wait. The link
does the dialling and the sleeping; nothing here touches the network or a clock,
so the policy is tested with a seeded :class:`random.Random`.

The policy, for a device with several releaser addresses:

- **Stickiness.** A round starts with the address that last worked, so a
  releaser coming back does not pull every device back at once.
- **Per-device order.** The others follow in an order shuffled by the device
  id (:func:`device_order`): fixed for one device, different across devices,
  so the fleet of a dead releaser spreads over the survivors instead of all
  landing on the next one in the list.
- **Backoff between full rounds**, exponential with full jitter:
  ``uniform(0, min(cap, base * 2**round))``.
- **A spread after a drop.** The first round after a live link dropped waits
  ``uniform(0, spread)`` first: the 5,000 devices of a killed releaser drop in
  the same second and must not all dial the survivors in that same second.

A single address keeps the link's historical backoff
(:func:`fleetpush.client.session.backoff_delay`); this module is only consulted
when there are several.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

#: rounds beyond this no longer double the delay (it is capped long before).
_MAX_DOUBLINGS = 30


def device_order(addresses: Sequence[str], device_id: str) -> tuple[str, ...]:
    """``addresses`` in this device's own shuffled order (the same on every call).

    Seeded from the device id alone (a string seed is hashed with SHA-512 by
    :class:`random.Random`, so the order is stable across runs and platforms).
    """
    order = list(dict.fromkeys(addresses))
    random.Random(f"fleetpush-failover:{device_id}").shuffle(order)
    return tuple(order)


def attempt_order(preferred: Sequence[str], last_good: str | None) -> tuple[str, ...]:
    """One round: ``last_good`` first (if it is still configured), then ``preferred``."""
    rest = tuple(a for a in preferred if a != last_good)
    if last_good is not None and last_good in preferred:
        return (last_good, *rest)
    return rest


def round_delay(round_no: int, base: float, cap: float, rng: random.Random) -> float:
    """The wait after full round ``round_no`` (0-based) failed: full jitter, capped."""
    ceiling = min(cap, base * 2.0 ** min(max(round_no, 0), _MAX_DOUBLINGS))
    return rng.uniform(0.0, ceiling)


def drop_delay(spread: float, rng: random.Random) -> float:
    """The wait before the first round after a live link dropped."""
    return rng.uniform(0.0, spread) if spread > 0 else 0.0


def next_wait(
    round_no: int, *, dropped: bool, base: float, cap: float, spread: float, rng: random.Random
) -> float:
    """How long the link waits before its next round.

    ``round_no`` counts the failed rounds (and short-lived links) since the last
    link that stayed up; ``dropped`` says a live link just ended. A drop after
    a stable link waits only the spread; a link that keeps dropping soon after
    it came up backs off like a failed round (never less than the spread), so
    a flapping releaser is not hammered.
    """
    if dropped and round_no == 0:
        return drop_delay(spread, rng)
    delay = round_delay(round_no, base, cap, rng)
    return max(delay, drop_delay(spread, rng)) if dropped else delay


def failed_over(previous: str | None, now: str) -> bool:
    """True when a new connection went to another releaser than the last good one."""
    return previous is not None and previous != now


__all__ = [
    "attempt_order",
    "device_order",
    "drop_delay",
    "failed_over",
    "next_wait",
    "round_delay",
]
