"""The one trial rule (client/trial_watch.py), for the embedded updater and the agent.

At the trial deadline a version nobody vouched for is rolled back. The agent
can vouch for its own child (alive through the whole trial, never restarted)
when no health command is configured; the embedded updater cannot, so there
only ``confirm()``/``confirm_after`` commit (before issue 9 the two hosts ran two
loops that disagreed without saying why). The pure decision is pinned by a
scenario table; the two hosts are pinned end to end, in process, on a real
install engine: the embedded updater (``Updater.run`` with an embedded host)
and ``fleetpush agent`` (``Agent.run`` with a real child process).
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import trio
from fleetpush.client.agent import Agent
from fleetpush.client.install import apply_staged
from fleetpush.client.state import DeviceState, load_state
from fleetpush.client.trial_watch import Step, TrialRules, decide
from fleetpush.client.updater import Updater
from fp_devices import device_config
from install_testlib import V1, V2, stage

BARE = TrialRules(trial_seconds=60)
SURVIVE = TrialRules(trial_seconds=60, confirm_after=30)
HEALTH = TrialRules(trial_seconds=60, health_check=True)
SUPERVISED = TrialRules(trial_seconds=60, supervised=True)
SUPERVISED_HEALTH = TrialRules(trial_seconds=60, health_check=True, supervised=True)
# The agent's: a pass must last health_interval with the same child alive (issue 11).
HELD_HEALTH = TrialRules(trial_seconds=60, health_check=True, supervised=True, health_hold=2)

# (rules, facts) -> the step and, for a rollback, its reason. started=0, deadline=60.
SCENARIOS: dict[str, tuple[TrialRules, dict[str, object], Step, str]] = {
    "no trial any more: ended": (BARE, dict(now=10.0, deadline=None), Step.ENDED, ""),
    "confirmed by the app: commit": (BARE, dict(now=10.0, confirmed=True), Step.COMMIT, ""),
    "confirmed even past the deadline: commit": (
        BARE,
        dict(now=99.0, confirmed=True),
        Step.COMMIT,
        "",
    ),
    "crashed during the trial: roll back": (
        SURVIVE,
        dict(now=10.0, alive=False),
        Step.ROLL_BACK,
        "the new version exited during its trial",
    ),
    "survived confirm_after: commit": (SURVIVE, dict(now=30.0), Step.COMMIT, ""),
    "not yet survived confirm_after: wait": (SURVIVE, dict(now=29.0), Step.WAIT, ""),
    "health command not run yet: probe it": (HEALTH, dict(now=10.0), Step.PROBE_HEALTH, ""),
    "health passes: commit": (HEALTH, dict(now=10.0, healthy=True), Step.COMMIT, ""),
    "health passes at the deadline: commit": (
        HEALTH,
        dict(now=60.0, healthy=True),
        Step.COMMIT,
        "",
    ),
    "health fails: wait": (HEALTH, dict(now=10.0, healthy=False), Step.WAIT, ""),
    "health never passed by the deadline: roll back": (
        HEALTH,
        dict(now=60.0, healthy=False),
        Step.ROLL_BACK,
        "health check did not pass within 60s",
    ),
    "nothing configured, before the deadline: wait": (BARE, dict(now=59.0), Step.WAIT, ""),
    "nothing configured, unconfirmed at the deadline: roll back (the rule of issue 9)": (
        BARE,
        dict(now=60.0),
        Step.ROLL_BACK,
        "not confirmed within 60s",
    ),
    "supervised child alive through the whole trial: commit (the supervisor witnessed it)": (
        SUPERVISED,
        dict(now=60.0),
        Step.COMMIT,
        "",
    ),
    "supervised child before the deadline: wait": (SUPERVISED, dict(now=59.0), Step.WAIT, ""),
    "supervised child restarted during the trial: it cannot vouch, roll back (issue 11)": (
        SUPERVISED,
        dict(now=60.0, restarted=True),
        Step.ROLL_BACK,
        "not confirmed within 60s (the app was restarted during its trial)",
    ),
    "supervised child that exited: roll back": (
        SUPERVISED,
        dict(now=10.0, alive=False),
        Step.ROLL_BACK,
        "the new version exited during its trial",
    ),
    "agent, first health pass (a stranger on the port may answer it): wait": (
        HELD_HEALTH,
        dict(now=10.0, healthy=True),
        Step.WAIT,
        "",
    ),
    "agent, health passing for less than the hold: wait": (
        HELD_HEALTH,
        dict(now=11.5, healthy=True, healthy_since=10.0),
        Step.WAIT,
        "",
    ),
    "agent, health passing for the whole hold, same child alive: commit": (
        HELD_HEALTH,
        dict(now=12.0, healthy=True, healthy_since=10.0),
        Step.COMMIT,
        "",
    ),
    "agent, child died while health passed (answered by a stranger): roll back": (
        HELD_HEALTH,
        dict(now=12.0, alive=False, healthy=True, healthy_since=10.0),
        Step.ROLL_BACK,
        "the new version exited during its trial",
    ),
    "supervised, health command never passed: roll back (health is stricter)": (
        SUPERVISED_HEALTH,
        dict(now=60.0, healthy=False),
        Step.ROLL_BACK,
        "health check did not pass within 60s",
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_trial_decision(name: str) -> None:
    rules, facts, step, reason = SCENARIOS[name]
    given: dict[str, object] = {"started": 0.0, "deadline": 60.0, **facts}
    verdict = decide(rules, **given)  # type: ignore[arg-type]
    assert (verdict.step, verdict.reason) == (step, reason)


# --- the two hosts, end to end ---------------------------------------------------------------

TRIAL = 1.0


def _closed_port() -> int:
    """A port nobody listens on: the releaser is unreachable (the updater must not care)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _on_trial(tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    """A device with 1.0 committed and 2.0 just applied, on trial for TRIAL seconds;
    neither confirm_after nor a health command configured."""
    cfg = device_config(
        tmp_path, _closed_port(), trial_seconds=TRIAL, health_interval=0.1, **overrides
    )
    assert cfg.confirm_after is None and cfg.health_command is None
    stage(cfg.state_dir, "1.0", 1, V1)
    apply_staged(cfg.state_dir, cfg.app_root, "1.0", time.time())
    stage(cfg.state_dir, "2.0", 2, V2)
    apply_staged(cfg.state_dir, cfg.app_root, "2.0", time.time(), trial_seconds=TRIAL)
    state = load_state(cfg.state_dir)
    assert state.installed_version == "2.0" and state.trial is not None
    return cfg


def _rolled_back(state: DeviceState) -> bool:
    return state.installed_version == "1.0" and state.trial is None and state.is_bad("2.0")


class EmbeddedHost:
    """The embedded updater's host, without the execs (supervises=False)."""

    supervises = False

    def __init__(self) -> None:
        self.restarted = trio.Event()

    async def apply(self, ctx, version: str) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError("nothing is applied in this test")

    async def restart_after_rollback(self, ctx) -> None:  # type: ignore[no-untyped-def]
        self.restarted.set()


async def test_embedded_unconfirmed_version_is_rolled_back_at_the_deadline(
    tmp_path: Path,
) -> None:
    cfg = _on_trial(tmp_path)
    host = EmbeddedHost()
    updater = Updater(cfg, host=host)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(updater.run)
            await host.restarted.wait()  # run -> trial watch -> rollback -> restart
            nursery.cancel_scope.cancel()
    state = load_state(cfg.state_dir)
    assert _rolled_back(state)
    assert "not confirmed within 1s" in str(state.history)


async def test_agent_version_failing_its_health_command_is_rolled_back_at_the_deadline(
    tmp_path: Path,
) -> None:
    cfg = _on_trial(tmp_path, stop_timeout=3.0, status_interval=1.0)
    cfg = cfg.evolve(health_command=[sys.executable, "-c", "raise SystemExit(1)"])
    agent = Agent(cfg, [sys.executable, "-c", "import time; time.sleep(60)"])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            first = agent.proc
            assert first is not None
            while not _rolled_back(load_state(cfg.state_dir)):
                await trio.sleep(0.1)
            # The child on trial was stopped, and the restored version started.
            while agent.proc is None or agent.proc is first:
                await trio.sleep(0.05)
            assert first.returncode is not None
            nursery.cancel_scope.cancel()
    assert "health check did not pass within 1s" in str(load_state(cfg.state_dir).history)
    assert agent.proc is None  # stopped with the agent: no child left behind


async def test_agent_keeps_a_child_that_ran_its_whole_trial(tmp_path: Path) -> None:
    cfg = _on_trial(tmp_path, stop_timeout=3.0, status_interval=1.0)
    agent = Agent(cfg, [sys.executable, "-c", "import time; time.sleep(60)"])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            first = agent.proc
            assert first is not None
            while load_state(cfg.state_dir).trial is not None:
                await trio.sleep(0.1)
            state = load_state(cfg.state_dir)
            assert state.installed_version == "2.0" and not state.is_bad("2.0")
            assert agent.proc is first and first.returncode is None  # never restarted
            nursery.cancel_scope.cancel()
    assert agent.proc is None


async def test_agent_child_restarted_during_its_trial_cannot_vouch(tmp_path: Path) -> None:
    # issue 11: the trial passes only while the agent's own child is alive and was
    # not restarted during it; a restarted child needs a confirmation or health.
    cfg = _on_trial(tmp_path, stop_timeout=3.0, status_interval=1.0)
    agent = Agent(cfg, [sys.executable, "-c", "import time; time.sleep(60)"])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            first = agent.proc
            assert first is not None
            await agent.restart()
            assert agent.proc is not None and agent.proc is not first
            while not _rolled_back(load_state(cfg.state_dir)):
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    assert "the app was restarted during its trial" in str(load_state(cfg.state_dir).history)
    assert agent.proc is None
