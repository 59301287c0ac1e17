"""The activity gate's pure decision (client/activity_policy.py; issue 12, part 3).

A scenario table keyed by prose, as python-tuf does: (activity, waiting,
policy, local time) -> the action and words of the reason. Times are UTC
(``tz=timezone.utc``) so the table does not depend on the machine's zone.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from fleetpush.client import ConfigError, UpdaterConfig
from fleetpush.client.activity_gate import policy_of
from fleetpush.client.activity_policy import (
    Action,
    Activity,
    Policy,
    Waiting,
    Window,
    evaluate,
)

T0 = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC).timestamp()  # 12:00:00 UTC


def at(hhmmss: str) -> float:
    """The epoch time of ``HH:MM[:SS]`` UTC on the test day."""
    parts = [int(p) for p in hhmmss.split(":")] + [0]
    return datetime(2026, 12, 4, parts[0], parts[1], parts[2], tzinfo=UTC).timestamp()


NIGHT = Window.parse("02:00-06:00")
MIDNIGHT = Window.parse("22:00-02:00")
DEFAULT = Policy()
WINDOWED = Policy(window=NIGHT)
WRAPPED = Policy(window=MIDNIGHT)


def users(n: int, age: float = 1.0) -> Activity:
    return Activity(users=n, time=T0 - age, source="report")


def push(forced: bool = True, since: float = T0, **kw: object) -> Waiting:
    return Waiting(version="1.1.0", forced=forced, since=since, **kw)  # type: ignore[arg-type]


# name -> (activity, waiting, policy, now, action, words in the reason, until)
SCENARIOS: dict[str, tuple[Activity, Waiting, Policy, float, Action, str, float | None]] = {
    "0 users: update now": (users(0), push(), DEFAULT, T0, Action.GO, "0 users active", None),
    "nothing ever reported: unknown counts as go by default": (
        Activity(),
        push(),
        DEFAULT,
        T0,
        Action.GO,
        "activity unknown (nothing reported)",
        None,
    ),
    "2 users: notify, the update starts notify_wait later": (
        users(2),
        push(),
        DEFAULT,
        T0,
        Action.NOTIFY,
        "2 users active (the app is notified, update at 12:01:00)",
        T0 + 60.0,
    ),
    "1 user, notified 59 s ago: still waiting": (
        users(1),
        push(notified_at=T0 - 59),
        DEFAULT,
        T0,
        Action.NOTIFY,
        "1 user active",
        T0 + 1.0,
    ),
    "1 user, notified notify_wait ago: go": (
        users(1),
        push(notified_at=T0 - 60),
        DEFAULT,
        T0,
        Action.GO,
        "1 user active: the app was notified",
        None,
    ),
    "3 users, window 02:00-06:00, noon: wait for the window (its opening is the next look)": (
        users(3),
        push(forced=False),
        WINDOWED,
        T0,
        Action.WAIT,
        "3 users active (waiting for window 02:00-06:00)",
        at("02:00") + 86400,
    ),
    "5 users in the window: notify then go": (
        users(5, age=1),
        push(),
        WINDOWED,
        at("03:00"),
        Action.NOTIFY,
        "5 users active",
        None,
    ),
    "5 users, no window: wait for the users to drop": (
        users(5),
        push(forced=False),
        DEFAULT,
        T0,
        Action.WAIT,
        "5 users active (waiting for fewer than 3)",
        None,
    ),
    "a forced push waits at most force_deadline: the reason says when it goes": (
        users(5),
        push(since=T0 - 100),
        Policy(force_deadline=300),
        T0,
        Action.WAIT,
        "5 users active (waiting for fewer than 3, forced at 12:03:20)",
        T0 + 200,
    ),
    "a forced push past force_deadline goes despite 5 users": (
        users(5),
        push(since=T0 - 300),
        Policy(force_deadline=300),
        T0,
        Action.GO_FORCED,
        "5 users active: forced push waited 300s (force_deadline)",
        None,
    ),
    "a non-forced update never goes forced": (
        users(5),
        push(forced=False, since=T0 - 10_000),
        Policy(force_deadline=300),
        T0,
        Action.WAIT,
        "5 users active",
        None,
    ),
    "forced with a window: woken by the earlier of the window and the deadline": (
        users(5),
        push(since=T0),
        Policy(window=NIGHT, force_deadline=600),
        T0,
        Action.WAIT,
        "5 users active (waiting for window 02:00-06:00, forced at 12:10:00)",
        T0 + 600,
    ),
    "stale report (older than max_age): unknown, go by default": (
        users(5, age=301),
        push(),
        DEFAULT,
        T0,
        Action.GO,
        "activity unknown (last report 301s old)",
        None,
    ),
    "stale report with activity_unknown = wait: waits like wait_at users": (
        users(0, age=301),
        push(forced=False),
        Policy(unknown="wait"),
        T0,
        Action.WAIT,
        "activity unknown (last report 301s old) (waiting for fewer than 3)",
        None,
    ),
    "unknown with activity_unknown = notify: notify then go": (
        Activity(),
        push(),
        Policy(unknown="notify"),
        T0,
        Action.NOTIFY,
        "activity unknown (nothing reported) (the app is notified",
        None,
    ),
    "busy_command failed: unknown, and the reason says so": (
        Activity(source="busy_command"), push(forced=False), Policy(unknown="wait"), T0,
        Action.WAIT, "activity unknown (busy_command failed) (waiting for fewer than 3)", None
    ),
    "a fresh report at max_age exactly is still believed": (
        users(5, age=300),
        push(forced=False),
        DEFAULT,
        T0,
        Action.WAIT,
        "5 users active",
        None,
    ),
    "the app is not running: nobody to disturb": (
        users(9),
        push(app_running=False),
        WINDOWED,
        T0,
        Action.GO,
        "the app is not running",
        None,
    ),
    "can_update() says busy: waits like wait_at users": (
        Activity(busy=True),
        push(forced=False),
        DEFAULT,
        T0,
        Action.WAIT,
        "the app says it is busy",
        None,
    ),
    "periodic update, 0 users, outside the window: waits for the window (as before)": (
        users(0),
        push(forced=False),
        WINDOWED,
        T0,
        Action.WAIT,
        "0 users active (waiting for window 02:00-06:00)",
        at("02:00") + 86400,
    ),
    "periodic update, 0 users, inside the window: go": (
        Activity(users=0, time=at("04:00")),
        push(forced=False),
        WINDOWED,
        at("04:00"),
        Action.GO,
        "0 users active",
        None,
    ),
    "window across midnight: 23:30 is inside": (
        Activity(users=4, time=at("23:30")),
        push(forced=False),
        WRAPPED,
        at("23:30"),
        Action.NOTIFY,
        "4 users active",
        None,
    ),
    "window across midnight: 01:59:59 is inside": (
        Activity(users=4, time=at("01:59:59")),
        push(forced=False),
        WRAPPED,
        at("01:59:59"),
        Action.NOTIFY,
        "4 users active",
        None,
    ),
    "window across midnight: 02:00 is outside (the end is not in it); opens at 22:00": (
        Activity(users=4, time=at("02:00")),
        push(forced=False),
        WRAPPED,
        at("02:00"),
        Action.WAIT,
        "4 users active (waiting for window 22:00-02:00)",
        at("22:00"),
    ),
    "notify_below lower than wait_at: between them, wait for fewer than notify_below": (
        users(2),
        push(forced=False),
        Policy(notify_below=2, wait_at=4),
        T0,
        Action.WAIT,
        "2 users active (waiting for fewer than 2)",
        None,
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_policy(name: str) -> None:
    activity, waiting, policy, now, action, words, until = SCENARIOS[name]
    verdict = evaluate(activity, waiting, policy, now, UTC)
    assert verdict.action is action, verdict
    assert words in verdict.reason, verdict.reason
    if until is not None:
        assert verdict.until == pytest.approx(until), verdict
    assert verdict.goes == (action in (Action.GO, Action.GO_FORCED))


@pytest.mark.parametrize(
    ("text", "inside", "outside"),
    [
        ("02:00-06:00", ["02:00", "05:59:59"], ["06:00", "01:59:59", "12:00"]),
        ("22:00-02:00", ["22:00", "23:59:59", "00:00", "01:59"], ["02:00", "21:59:59"]),
        ("12:00:05-12:00:10", ["12:00:05", "12:00:09"], ["12:00:04", "12:00:10"]),
    ],
)
def test_window_bounds(text: str, inside: list[str], outside: list[str]) -> None:
    w = Window.parse(text)
    for t in inside:
        local = datetime.fromtimestamp(at(t), UTC)
        assert w.contains(local), t
        assert w.opens_in(local) == 0.0
    for t in outside:
        local = datetime.fromtimestamp(at(t), UTC)
        assert not w.contains(local), t
        assert 0 < w.opens_in(local) < 86400


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("2-6", "is not HH:MM-HH:MM"),
        ("24:00-06:00", "invalid time"),
        ("02:60-06:00", "invalid time"),
        ("02:00-02:00", "empty"),
    ],
)
def test_window_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Window.parse(text)


def test_window_text_is_normalised() -> None:
    assert Window.parse(" 2:00 - 6:00 ").text == "02:00-06:00"
    assert Window.parse("12:00:05-12:00:10").text == "12:00:05-12:00:10"


def test_policy_rejects_an_unknown_unknown() -> None:
    with pytest.raises(ValueError, match="activity_unknown must be go, notify or wait"):
        Policy(unknown="maybe")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(maintenance_window="2-6"), "maintenance_window '2-6' is not HH:MM-HH:MM"),
        (dict(notify_below=4), "notify_below must not exceed wait_at"),
        (dict(wait_at=0), "wait_at must be a whole number >= 1, got 0"),
        (dict(notify_below=True), "notify_below must be a whole number >= 1, got True"),
        (dict(activity_unknown="maybe"), "activity_unknown must be go, notify or wait"),
        (dict(notify_wait=-1), "notify_wait must not be negative"),
    ],
)
def test_agent_toml_refuses_a_bad_gate_setting(setting: dict[str, object], message: str) -> None:
    base = dict(app="demo", state_dir="/tmp/s", app_root="/tmp/a", insecure=True)
    with pytest.raises(ConfigError, match=re.escape(message)):
        UpdaterConfig.from_mapping({**base, **setting})


def test_agent_toml_gate_settings_reach_the_policy() -> None:
    cfg = UpdaterConfig.from_mapping(
        dict(
            app="demo",
            state_dir="/tmp/s",
            app_root="/tmp/a",
            insecure=True,
            notify_below=2,
            notify_wait=5,
            wait_at=4,
            activity_max_age=60,
            activity_unknown="wait",
            force_deadline=30,
            maintenance_window="22:00-02:00",
        )
    )
    assert policy_of(cfg) == Policy(
        notify_below=2,
        notify_wait=5,
        wait_at=4,
        max_age=60,
        unknown="wait",
        force_deadline=30,
        window=Window(start=22 * 3600, end=2 * 3600),
    )
