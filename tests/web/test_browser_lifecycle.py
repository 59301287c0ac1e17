"""The browser harness never leaves a chromium behind, and skips or fails as CI needs.

The process cases run a real inner pytest (``-p fp_browser``) on a small test
file in tmp_path, then look in /proc for live processes of chromium's group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fp_browser import REQUIRE_ENV, Chromium, chromium_or_skip

SUPPORT = Path(__file__).parents[1] / "support"
INNER_HEAD = """
import os, signal, time
from pathlib import Path

def record(chromium):
    pid_file = Path(os.environ["FP_PIDFILE"])
    pid_file.with_suffix(".new").write_text(f"{chromium.proc.pid} {chromium.home}")
    pid_file.with_suffix(".new").replace(pid_file)  # whole, never half written
"""
# A test that fails, then one that is interrupted (SIGINT): the session ends
# there and its teardown must still stop the browser.
FAIL_THEN_INTERRUPT = """
def test_fails(page, chromium):
    record(chromium)
    page.goto("data:text/html,<h1>inner</h1>")
    assert page.text("h1") == "something else"

def test_interrupted(page):
    page.goto("data:text/html,<h1>second</h1>")
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
"""
HANGS = """
def test_hangs(page, chromium):
    page.goto("data:text/html,<h1>inner</h1>")
    record(chromium)
    time.sleep(60)
"""


def _alive(pgid: int, home: Path) -> list[str]:
    """The live processes of chromium's group, or naming its temp home: its crash
    handlers start their own groups. Killed children are reparented to PID 1,
    which may not reap them (a container's init): zombies are dead enough."""
    alive = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        ours = int(fields[2]) == pgid or str(home).encode() in cmdline
        if ours and fields[0] != "Z":
            alive.append(f"{proc.name} ({fields[0]}): {cmdline[:80]!r}")
    return alive


def _wait_gone(pid_file: Path, timeout: float = 15) -> list[str]:
    pid, home = pid_file.read_text().split(" ", 1)
    deadline = time.monotonic() + timeout
    while (alive := _alive(int(pid), Path(home))) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _inner(tmp_path: Path, tests: str) -> subprocess.Popen[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_inner.py").write_text(INNER_HEAD + tests)
    env = os.environ | {"PYTHONPATH": str(SUPPORT), "FP_PIDFILE": str(tmp_path / "pid")}
    return subprocess.Popen(
        # Without the trio and hypothesis plugins the inner run starts seconds sooner.
        [sys.executable, "-P", "-m", "pytest", "-p", "fp_browser", "-p", "no:cacheprovider",
         "-p", "no:trio", "-p", "no:hypothesispytest", "-q", "-rA",
         f"--basetemp={tmp_path / 'bt'}", "test_inner.py"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float = 90) -> str:
    """The inner run's output, once it ends; killed (and a failure) after ``timeout``."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)  # and close the pipe
        raise AssertionError(f"the inner pytest ran over {timeout}s:\n{out}") from None
    return out


def test_a_failed_then_interrupted_run_leaves_a_screenshot_and_no_browser(
    chromium: Chromium, tmp_path: Path
) -> None:
    out = _finish(_inner(tmp_path, FAIL_THEN_INTERRUPT))
    assert "1 failed" in out, out
    assert "KeyboardInterrupt" in out, out
    assert _wait_gone(tmp_path / "pid") == []
    home = Path((tmp_path / "pid").read_text().split(" ", 1)[1])
    assert not home.exists()
    shots = list((tmp_path / "bt").glob("test_fails0/*-failure.png"))
    assert len(shots) == 1, out
    assert shots[0].read_bytes()[:4] == b"\x89PNG"


def test_a_killed_pytest_leaves_no_browser(chromium: Chromium, tmp_path: Path) -> None:
    proc = _inner(tmp_path, HANGS)
    pid_file = tmp_path / "pid"
    try:
        # Generous: on a loaded machine the inner pytest and chromium start slowly.
        deadline = time.monotonic() + 90
        while not pid_file.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the inner test never started its browser"
            time.sleep(0.1)
        assert pid_file.exists(), "the inner pytest ended before its test started"
        pid, home = pid_file.read_text().split(" ", 1)
        assert len(_alive(int(pid), Path(home))) > 1  # the browser and its helpers run
    finally:
        proc.send_signal(signal.SIGKILL)  # no teardown runs: only PDEATHSIG can help
        _finish(proc)
    assert _wait_gone(pid_file) == []


def test_missing_chromium_skips_unless_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETPUSH_CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium not found"):
        chromium_or_skip()
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ENV}=1 requires the browser"):
        chromium_or_skip()


def test_an_explicit_chromium_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETPUSH_CHROMIUM", "/bin/true")
    assert chromium_or_skip() == "/bin/true"
