"""A real headless browser for the tests: chromium driven over the DevTools protocol.

:class:`Chromium` starts one ``chromium --headless`` with its own temporary
profile and always stops it (its whole process group, and the kernel kills it
if pytest itself dies). :meth:`Chromium.new_page` opens a tab in a fresh
browser context, so cookies never leak from one test to the next; the tab is
a :class:`Page` (tests/support/fp_cdp.py, re-exported here), whose waits are
all bounded and save a screenshot in the test's ``tmp_path`` when they run out.

The calls block: from a trio test use ``await trio.to_thread.run_sync(page.goto, url)``.

Fixtures (import them and the two hooks at the end in a conftest, as
tests/web/conftest.py does, or load this module with ``-p fp_browser``):
``chromium`` (one browser per session; skipped when chromium is missing,
failed instead when ``FLEETPUSH_REQUIRE_BROWSER=1``, as CI sets) and ``page``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from fp_cdp import (
    POLL,
    BrowserError,
    Cookie,
    DevToolsSocket,
    Dialog,
    FailedRequest,
    Page,
    WaitTimeout,
)

__all__ = [
    "BrowserError",
    "Chromium",
    "Cookie",
    "Dialog",
    "FailedRequest",
    "Page",
    "WaitTimeout",
    "chromium",
    "chromium_or_skip",
    "find_chromium",
    "page",
    "running_chromium",
]

# Without the background-networking flags chromium keeps dialling Google's
# services, which this machine's closed network refuses, and it logs and
# retries; --no-proxy-server keeps 127.0.0.1 direct whatever the environment.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-proxy-server",
    "--window-size=1280,900",
    "--remote-debugging-port=0",
)
START_TIMEOUT = 30.0
REQUIRE_ENV = "FLEETPUSH_REQUIRE_BROWSER"
MARKER_HELP = "drives a real headless chromium (tests/support/fp_browser.py)"


def find_chromium() -> str | None:
    """The chromium to run: ``$FLEETPUSH_CHROMIUM``, else one on PATH, else None."""
    explicit = os.environ.get("FLEETPUSH_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if the thread that started chromium dies (pytest killed
    # with SIGKILL), the kernel kills chromium too, so no browser outlives a run.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class Chromium:
    """One headless chromium process and its browser-level DevTools socket."""

    def __init__(self, exe: str, parent: Path | None = None) -> None:
        """Start chromium with its own temp home, in ``parent`` (default: the system's).

        Raises BrowserError when it exits or does not listen within START_TIMEOUT.
        """
        self.exe = exe
        self.home = Path(tempfile.mkdtemp(prefix="fp-chromium-", dir=parent))
        self._log = self.home / "chromium.log"
        profile = self.home / "profile"
        # Chromium's crash handler keeps its database under $XDG_CONFIG_HOME
        # whatever the profile; keep that in our temp folder too.
        env = os.environ | {"XDG_CONFIG_HOME": str(self.home / "config")}
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                process_group=0, preexec_fn=_die_with_parent,
            )  # fmt: skip
        try:
            self.port, browser_path = self._read_port(profile / "DevToolsActivePort")
            self._sock = DevToolsSocket(
                f"ws://127.0.0.1:{self.port}{browser_path}", lambda m, p: None
            )
        except BaseException:
            self.close()
            raise

    def _read_port(self, port_file: Path) -> tuple[int, str]:
        # Chromium writes "<port>\n<browser websocket path>" once it listens.
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                status = self.proc.returncode
                raise BrowserError(f"chromium exited with {status}: {self.log_tail()}")
            with contextlib.suppress(FileNotFoundError):
                lines = port_file.read_text().splitlines()
                if len(lines) >= 2:
                    return int(lines[0]), lines[1]
            time.sleep(POLL)
        raise BrowserError(f"chromium did not listen within {START_TIMEOUT}s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def new_page(self, artifacts: Path) -> Page:
        """A blank tab in a fresh browser context (its own cookies and storage)."""
        context = self._sock.call("Target.createBrowserContext")["browserContextId"]
        target = self._sock.call(
            "Target.createTarget", url="about:blank", browserContextId=context
        )["targetId"]

        def dispose() -> None:
            with contextlib.suppress(BrowserError):
                self._sock.call("Target.closeTarget", targetId=target)
                self._sock.call("Target.disposeBrowserContext", browserContextId=context)

        try:
            return Page(f"ws://127.0.0.1:{self.port}/devtools/page/{target}", artifacts, dispose)
        except BaseException:
            dispose()
            raise

    def close(self) -> None:
        """Stop chromium and every process it started, then remove its profile."""
        sock = getattr(self, "_sock", None)
        if sock is not None:
            with contextlib.suppress(BrowserError):
                sock.call("Browser.close", timeout=3.0)
            sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        # The renderers and zygote share chromium's process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        shutil.rmtree(self.home, ignore_errors=True)


@contextlib.contextmanager
def running_chromium(exe: str, parent: Path | None = None) -> Iterator[Chromium]:
    browser = Chromium(exe, parent)
    try:
        yield browser
    finally:
        browser.close()


def chromium_or_skip() -> str:
    """The chromium to run; skips the test without one, or fails it when CI requires one."""
    exe = find_chromium()
    if exe is None:
        why = "chromium not found: apt-get install -y chromium, or set FLEETPUSH_CHROMIUM"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{why} ({REQUIRE_ENV}=1 requires the browser tests)", pytrace=False)
        pytest.skip(why)
    return exe


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    """One headless chromium for the session; skipped without one, unless CI requires it."""
    # Its home is in pytest's base temp, so even a SIGKILLed run leaves nothing
    # that pytest's own retention of old runs does not remove.
    with running_chromium(chromium_or_skip(), tmp_path_factory.getbasetemp()) as browser:
        yield browser


@pytest.fixture
def page(chromium: Chromium, tmp_path: Path) -> Iterator[Page]:
    """A fresh tab; its screenshots go to ``tmp_path``."""
    tab = chromium.new_page(tmp_path)
    try:
        yield tab
    finally:
        tab.close()


# Hooks: a conftest imports them with the fixtures (tests/web/conftest.py), or
# a pytest run loads this module as a plugin with ``-p fp_browser``.


def pytest_configure(config: pytest.Config) -> None:
    # Registered here as well as in pyproject, for runs with ``-p fp_browser``.
    config.addinivalue_line("markers", f"browser: {MARKER_HELP}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the browser ``browser``, so ``-m 'not browser'`` works."""
    for item in items:
        if "chromium" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test leaves a screenshot of its page (``NN-failure.png`` in tmp_path)."""
    report: pytest.TestReport = yield
    tab = getattr(item, "funcargs", {}).get("page")
    if report.when == "call" and report.failed and isinstance(tab, Page):
        tab.failure_shot()  # the call report comes before the page fixture closes the tab
    return report
