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
from fp_browser import REQUIRE_ENV, Chromium, chromium_or_skip, running_chromium

SUPPORT = Path(__file__).parents[1] / "support"
INNER = """
import os, signal, time
from pathlib import Path

def test_inner(page, chromium):
    Path(os.environ["FP_PIDFILE"]).write_text(f"{{chromium.proc.pid}} {{chromium.home}}")
    page.goto("data:text/html,<h1>inner</h1>")
    {action}
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


def _inner(tmp_path: Path, action: str) -> subprocess.Popen[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_inner.py").write_text(INNER.format(action=action))
    env = os.environ | {"PYTHONPATH": str(SUPPORT), "FP_PIDFILE": str(tmp_path / "pid")}
    return subprocess.Popen(
        # Without the trio and hypothesis plugins the inner run starts seconds sooner.
        [sys.executable, "-P", "-m", "pytest", "-p", "fp_browser", "-p", "no:cacheprovider",
         "-p", "no:trio", "-p", "no:hypothesispytest", "-q", "-rA",
         f"--basetemp={tmp_path / 'bt'}", "test_inner.py"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    return out


def test_close_stops_chromium_and_its_children(chromium: Chromium, tmp_path: Path) -> None:
    with running_chromium(chromium.exe, tmp_path) as browser:
        pid_file = tmp_path / "pid"
        pid_file.write_text(f"{browser.proc.pid} {browser.home}")
        assert len(_alive(browser.proc.pid, browser.home)) > 1  # chromium has helpers
    assert browser.proc.returncode is not None
    assert _wait_gone(pid_file) == []
    assert not browser.home.exists()


def test_a_failed_test_leaves_a_screenshot_and_no_browser(
    chromium: Chromium, tmp_path: Path
) -> None:
    out = _finish(_inner(tmp_path, "assert page.text('h1') == 'something else'"))
    assert "1 failed" in out, out
    assert _wait_gone(tmp_path / "pid") == []
    shots = list((tmp_path / "bt").glob("test_inner0/*-failure.png"))
    assert len(shots) == 1, out
    assert shots[0].read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_run_leaves_no_browser(chromium: Chromium, tmp_path: Path) -> None:
    out = _finish(_inner(tmp_path, "os.kill(os.getpid(), signal.SIGINT); time.sleep(30)"))
    assert "KeyboardInterrupt" in out, out
    assert _wait_gone(tmp_path / "pid") == []


def test_a_killed_pytest_leaves_no_browser(chromium: Chromium, tmp_path: Path) -> None:
    proc = _inner(tmp_path, "time.sleep(60)")
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "pid").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the inner test never started its browser"
            time.sleep(0.1)
        time.sleep(0.5)  # let goto start the renderer
        proc.send_signal(signal.SIGKILL)  # no teardown runs: only PDEATHSIG can help
    finally:
        _finish(proc)
    assert _wait_gone(tmp_path / "pid") == []


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
