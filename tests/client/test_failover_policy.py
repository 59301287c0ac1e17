"""The device's failover choice (client/failover.py, issue 15 §2): pure, seeded.

Which releaser is tried next and how long the link waits are decided from the
configured addresses, the last good one, the round number and a random source
passed in; these tests pin the policy without a network or a clock.
"""

from __future__ import annotations

import random

import pytest
from fleetpush.client.config import ConfigError, UpdaterConfig, server_list
from fleetpush.client.failover import (
    attempt_order,
    device_order,
    drop_delay,
    failed_over,
    next_wait,
    round_delay,
)

ADDRESSES = ("a:7878", "b:7878", "c:7878", "d:7878")


def test_device_order_is_a_permutation_fixed_per_device() -> None:
    first = device_order(ADDRESSES, "dev-1")
    assert sorted(first) == sorted(ADDRESSES)
    assert device_order(ADDRESSES, "dev-1") == first  # the same on every call


def test_device_order_differs_across_devices() -> None:
    """The devices of a dead releaser spread over the others, not all onto one."""
    seconds = {device_order(ADDRESSES, f"dev-{i}")[0] for i in range(200)}
    assert seconds == set(ADDRESSES)


def test_device_order_drops_duplicates() -> None:
    assert sorted(device_order(("a:1", "a:1", "b:1"), "dev-1")) == ["a:1", "b:1"]


ORDER_CASES = {
    "nothing worked yet: the device's own order": (None, ("c", "a", "b"), ("c", "a", "b")),
    "stickiness: the last good address comes first": ("b", ("c", "a", "b"), ("b", "c", "a")),
    "the last good one already first: unchanged": ("c", ("c", "a", "b"), ("c", "a", "b")),
    "a last good address no longer configured is ignored": ("z", ("c", "a"), ("c", "a")),
}


@pytest.mark.parametrize("case", ORDER_CASES)
def test_attempt_order(case: str) -> None:
    last_good, preferred, want = ORDER_CASES[case]
    assert attempt_order(preferred, last_good) == want


def test_round_delay_is_full_jitter_under_an_exponential_cap() -> None:
    rng = random.Random(7)
    for round_no in range(12):
        ceiling = min(30.0, 1.0 * 2**round_no)
        delays = [round_delay(round_no, 1.0, 30.0, rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # full jitter: the waits use the whole range, down to near zero
        assert min(delays) < ceiling * 0.1
        assert max(delays) > ceiling * 0.9


def test_round_delay_never_exceeds_the_cap_however_many_rounds() -> None:
    rng = random.Random(1)
    assert all(round_delay(n, 1.0, 30.0, rng) <= 30.0 for n in (50, 1_000, 10**9))


def test_round_delay_is_reproducible_with_a_seeded_random() -> None:
    a = [round_delay(n, 0.5, 60.0, random.Random(3)) for n in range(5)]
    b = [round_delay(n, 0.5, 60.0, random.Random(3)) for n in range(5)]
    assert a == b


def test_drop_delay_spreads_a_fleet_over_the_whole_spread() -> None:
    """5,000 devices dropped together do not all dial again in the same second."""
    rng = random.Random(11)
    delays = [drop_delay(5.0, rng) for _ in range(5_000)]
    assert all(0.0 <= d <= 5.0 for d in delays)
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(5)]
    assert all(800 < n < 1_200 for n in per_second), per_second


def test_drop_delay_zero_spread_is_immediate() -> None:
    assert drop_delay(0.0, random.Random(1)) == 0.0


WAIT = dict(base=1.0, cap=30.0, spread=5.0)


def test_next_wait_after_a_stable_link_dropped_is_the_spread_alone() -> None:
    rng = random.Random(5)
    waits = [next_wait(0, dropped=True, rng=rng, **WAIT) for _ in range(500)]
    assert all(0.0 <= w <= 5.0 for w in waits)
    assert min(waits) < 0.5  # some devices come back at once: it is a spread, not a delay


def test_next_wait_for_a_flapping_link_backs_off_but_never_below_the_spread() -> None:
    rng = random.Random(6)
    waits = [next_wait(6, dropped=True, rng=rng, **WAIT) for _ in range(500)]
    assert all(0.0 <= w <= 30.0 for w in waits)
    assert max(waits) > 25.0  # round 6 reaches the 30 s cap, unlike the 5 s spread


def test_next_wait_after_a_failed_round_is_the_round_backoff() -> None:
    a = next_wait(3, dropped=False, rng=random.Random(9), **WAIT)
    b = round_delay(3, 1.0, 30.0, random.Random(9))
    assert a == b


def test_failed_over() -> None:
    assert failed_over("a", "b")
    assert not failed_over("a", "a")
    assert not failed_over(None, "a")  # the first connection is no failover


# --- the settings -----------------------------------------------------------------------

BASE = dict(app="demo", state_dir="s", app_root="a", insecure=True)


def test_server_accepts_one_address_as_before() -> None:
    cfg = UpdaterConfig.from_mapping({**BASE, "server": "10.0.0.1:7878"})
    assert cfg.server == "10.0.0.1:7878"
    assert cfg.servers == ("10.0.0.1:7878",)
    assert cfg.address == ("10.0.0.1", 7878)


def test_server_accepts_a_list() -> None:
    cfg = UpdaterConfig.from_mapping({**BASE, "server": ["a:1", "b:2"]})
    assert cfg.servers == ("a:1", "b:2")
    assert cfg.address == ("a", 1)


def test_server_comma_separated_string_is_a_list_too() -> None:
    assert server_list("a:1, b:2") == ("a:1", "b:2")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([], "no releaser address"),
        (["a:1", "b:x"], "the port 'x' is not a number"),
        ([1, 2], "want an address or a list"),
    ],
)
def test_server_list_errors_name_the_setting(value: object, words: str) -> None:
    with pytest.raises(ConfigError, match=r"^server: ") as info:
        UpdaterConfig.from_mapping({**BASE, "server": value})
    assert words in str(info.value)


def test_tls_pin_accepts_a_list() -> None:
    cfg = UpdaterConfig.from_mapping({**BASE, "tls_pin": ["ab" * 32, "cd" * 32]})
    tls = cfg.client_tls()
    assert tls is not None and tls.pin_sha256 == ("ab" * 32, "cd" * 32)


def test_tls_pin_empty_list_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^tls_pin: "):
        UpdaterConfig.from_mapping({**BASE, "tls_pin": []})


def test_check_pin_any_of_several_matches() -> None:
    """Several releasers with their own self-signed certificates: any listed pin will do."""
    from fleetpush.net.tls import TlsError, check_pin, fingerprint

    der = b"a certificate, as far as the pin is concerned"
    other = "00" * 32
    check_pin(der, (other, fingerprint(der)))
    check_pin(der, fingerprint(der).upper())  # one pin, as before
    with pytest.raises(TlsError, match="does not match any of the 2 pins"):
        check_pin(der, (other, "11" * 32))
