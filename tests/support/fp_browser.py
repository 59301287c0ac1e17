"""A real headless browser for the tests: chromium driven over the DevTools protocol.

:class:`Chromium` starts one ``chromium --headless`` with its own temporary
profile and always stops it (its whole process group, and the kernel kills it
if pytest itself dies). :meth:`Chromium.new_page` opens a tab in a fresh
browser context, so cookies never leak from one test to the next. A
:class:`Page` is a small synchronous CDP client over one websocket
(websocket-client): goto, wait_for, eval, click, fill, text, cookies,
screenshot; it records console errors and failed requests so a test can
assert the page had none (:meth:`Page.assert_clean`).

Every wait is bounded. A wait that runs out raises :class:`WaitTimeout`
naming the condition or selector and the page URL, after saving a screenshot
in the page's artifacts folder (the test's ``tmp_path``).

The calls block: from a trio test use ``await trio.to_thread.run_sync(page.goto, url)``.

Fixtures (import them in a conftest, as tests/web/conftest.py does):
``chromium`` (one browser per session; skipped when chromium is missing,
failed instead when ``FLEETPUSH_REQUIRE_BROWSER=1``, as CI sets) and ``page``.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import websocket

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
VIEWPORT = (1280, 900)
START_TIMEOUT = 30.0
CALL_TIMEOUT = 10.0
POLL = 0.05
REQUIRE_ENV = "FLEETPUSH_REQUIRE_BROWSER"


class BrowserError(Exception):
    """The browser or a page failed: it did not start, a call failed or timed out."""


class WaitTimeout(BrowserError):
    """A bounded wait ran out; the message names what and where, and the screenshot."""


@attrs.frozen(kw_only=True)
class Cookie:
    name: str
    value: str
    domain: str
    path: str
    http_only: bool
    secure: bool
    same_site: str | None  # "Strict", "Lax", "None", or None when unset


@attrs.frozen(kw_only=True)
class FailedRequest:
    url: str
    status: int | None  # HTTP status >= 400, or None when the request never completed
    error: str


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


class _Socket:
    """One DevTools websocket: numbered calls, with every event passed to ``on_event``."""

    def __init__(self, url: str, on_event: Callable[[str, dict[str, Any]], None]) -> None:
        self.url = url
        self._on_event = on_event
        self._ids = itertools.count(1)
        try:
            # Chromium refuses websocket handshakes carrying an Origin header
            # unless started with --remote-allow-origins; we send none.
            self._ws = websocket.create_connection(url, timeout=CALL_TIMEOUT, suppress_origin=True)
        except (OSError, websocket.WebSocketException) as e:
            raise BrowserError(f"cannot connect to DevTools at {url}: {e}") from e

    def call(self, method: str, timeout: float = CALL_TIMEOUT, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events read meanwhile go to on_event.

        Raises BrowserError when the browser answers with an error, the socket
        fails, or no answer comes within ``timeout`` seconds.
        """
        call_id = next(self._ids)
        deadline = time.monotonic() + timeout
        try:
            self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
            while True:
                self._ws.settimeout(max(deadline - time.monotonic(), 0.001))
                message = json.loads(self._ws.recv())
                if "method" in message:
                    self._on_event(message["method"], message.get("params", {}))
                elif message.get("id") == call_id:
                    break
        except websocket.WebSocketTimeoutException as e:
            raise BrowserError(f"{method}: no answer from the browser in {timeout}s") from e
        except (OSError, ValueError, websocket.WebSocketException) as e:
            raise BrowserError(f"{method}: DevTools connection failed: {e}") from e
        if "error" in message:
            raise BrowserError(f"{method}: {message['error'].get('message', message['error'])}")
        result: dict[str, Any] = message.get("result", {})
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError, websocket.WebSocketException):
            self._ws.close()


class Page:
    """One tab in its own browser context. Not thread-safe: one caller at a time."""

    def __init__(self, sock_url: str, artifacts: Path, dispose: Callable[[], None]) -> None:
        self.artifacts = artifacts
        self.console_errors: list[str] = []
        self.failed_requests: list[FailedRequest] = []
        self._dispose = dispose
        self._loads = 0
        self._shots = itertools.count(1)
        self._urls: dict[str, str] = {}
        self._sock = _Socket(sock_url, self._on_event)
        for domain in ("Page", "Runtime", "Network", "Log"):
            self._sock.call(f"{domain}.enable")
        # A headless window's viewport depends on chromium's window decorations;
        # fixing it keeps layouts and screenshots the same everywhere.
        width, height = VIEWPORT
        self._sock.call(
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip

    # -- events ---------------------------------------------------------------

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self._loads += 1
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            self.console_errors.append(" ".join(_remote_text(a) for a in args))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exc = details.get("exception", {})
            self.console_errors.append(exc.get("description") or details.get("text", "?"))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            # Network errors are in failed_requests already, with their URL.
            if entry.get("level") == "error" and entry.get("source") != "network":
                self.console_errors.append(f"{entry.get('source')}: {entry.get('text')}")
        elif method == "Network.requestWillBeSent":
            self._urls[params["requestId"]] = params["request"]["url"]
        elif method == "Network.responseReceived":
            response = params["response"]
            if response.get("status", 0) >= 400:
                failure = FailedRequest(
                    url=response["url"], status=response["status"],
                    error=response.get("statusText", ""),
                )  # fmt: skip
                self.failed_requests.append(failure)
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            url = self._urls.get(params["requestId"], "?")
            failure = FailedRequest(url=url, status=None, error=params.get("errorText", ""))
            self.failed_requests.append(failure)

    def assert_clean(self) -> None:
        """Fail unless the page logged no console error and every request succeeded."""
        self._sock.call("Runtime.evaluate", expression="0")  # read events sent so far
        assert self.console_errors == [], f"console errors on {self.url}"
        assert self.failed_requests == [], f"failed requests on {self.url}"

    # -- navigation and script ------------------------------------------------

    @property
    def url(self) -> str:
        try:
            return str(self.eval("location.href"))
        except BrowserError:
            return "?"

    def goto(self, url: str, timeout: float = CALL_TIMEOUT) -> None:
        """Open ``url`` and wait for its load event.

        Raises BrowserError when the navigation fails (connection refused...),
        WaitTimeout when the page does not finish loading within ``timeout``.
        """
        loads = self._loads
        result = self._sock.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        # Events before navigate's answer belong to the previous document, so
        # the next load event is this one's.
        self._wait(lambda: self._loads > loads, f"the load of {url}", timeout)

    def eval(self, js: str) -> Any:
        """The value of a JS expression (promises awaited), as JSON-like Python.

        Raises BrowserError when the script throws.
        """
        result = self._sock.call(
            "Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"script failed on this page: {js!r}: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, js_condition: str, timeout: float = 5.0) -> None:
        """Wait until the JS expression is truthy; a throwing expression counts as false.

        Raises WaitTimeout naming the condition and the URL, with a screenshot.
        """
        self._wait(lambda: self._truthy(js_condition), f"condition {js_condition!r}", timeout)

    def wait_for_selector(self, selector: str, timeout: float = 5.0) -> None:
        """Wait until an element matches the CSS selector and is displayed."""
        sel = json.dumps(selector)
        js = f"(e => e !== null && e.getClientRects().length > 0)(document.querySelector({sel}))"
        self._wait(lambda: self._truthy(js), f"selector {selector!r}", timeout)

    def _truthy(self, js: str) -> bool:
        # Mid-navigation the old document's context is gone and evaluate
        # throws; that is "not yet", not a failure.
        try:
            return bool(self.eval(js))
        except BrowserError:
            return False

    def _wait(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            # A cheap call reads the events that arrived, such as load events.
            self._sock.call("Runtime.evaluate", expression="0")
            if done():
                return
            if time.monotonic() >= deadline:
                shot = self.failure_shot()
                where = self.url
                raise WaitTimeout(f"waited {timeout}s for {what} on {where} (screenshot: {shot})")
            time.sleep(POLL)

    # -- the DOM --------------------------------------------------------------

    def click(self, selector: str, *, wait_load: bool = False, timeout: float = 5.0) -> None:
        """Click the element's centre with real mouse events, as a user would.

        With ``wait_load``, also wait for the page the click opens (a link, a form).
        """
        self.wait_for_selector(selector, timeout)
        loads = self._loads
        sel = json.dumps(selector)
        box = self.eval(
            f"(e => {{ e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();"
            f" return [r.x + r.width / 2, r.y + r.height / 2]; }})(document.querySelector({sel}))"
        )
        x, y = float(box[0]), float(box[1])
        for kind in ("mousePressed", "mouseReleased"):
            self._sock.call(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )
        if wait_load:
            self._wait(lambda: self._loads > loads, f"the page opened by {selector!r}", timeout)

    def fill(self, selector: str, text: str, timeout: float = 5.0) -> None:
        """Replace an input's value by typing ``text`` into it (input and change events fire)."""
        self.wait_for_selector(selector, timeout)
        sel = json.dumps(selector)
        self.eval(f"(e => {{ e.focus(); e.value = ''; }})(document.querySelector({sel}))")
        self._sock.call("Input.insertText", text=text)
        self.eval(
            f"document.querySelector({sel}).dispatchEvent(new Event('change', {{bubbles: true}}))"
        )

    def text(self, selector: str, timeout: float = 5.0) -> str:
        """The rendered text of the first element matching ``selector``."""
        self.wait_for_selector(selector, timeout)
        return str(self.eval(f"document.querySelector({json.dumps(selector)}).innerText"))

    def cookies(self) -> list[Cookie]:
        """The cookies the browser holds for the current URL, HttpOnly ones included."""
        return [_cookie(c) for c in self._sock.call("Network.getCookies")["cookies"]]

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport at ``path`` and return it."""
        data = self._sock.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def shot(self, name: str) -> Path:
        """A screenshot in the artifacts folder, numbered in order: ``03-devices.png``."""
        return self.screenshot(self.artifacts / f"{next(self._shots):02d}-{name}.png")

    def failure_shot(self) -> Path | str:
        """A screenshot named "failure", or why there is none (never raises)."""
        try:
            return self.shot("failure")
        except BrowserError as e:
            return f"none ({e})"

    def close(self) -> None:
        self._sock.close()
        self._dispose()


def _cookie(c: dict[str, Any]) -> Cookie:
    return Cookie(
        name=c["name"], value=c["value"], domain=c["domain"], path=c["path"],
        http_only=c["httpOnly"], secure=c["secure"], same_site=c.get("sameSite"),
    )  # fmt: skip


def _remote_text(obj: dict[str, Any]) -> str:
    if "value" in obj:
        return str(obj["value"])
    return str(obj.get("description", obj.get("type", "?")))


class Chromium:
    """One headless chromium process and its browser-level DevTools socket."""

    def __init__(self, exe: str) -> None:
        self.exe = exe
        self.home = Path(tempfile.mkdtemp(prefix="fp-chromium-"))
        self._log = self.home / "chromium.log"
        profile = self.home / "profile"
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                process_group=0, preexec_fn=_die_with_parent,
            )  # fmt: skip
        try:
            self.port, browser_path = self._read_port(profile / "DevToolsActivePort")
            self._sock = _Socket(f"ws://127.0.0.1:{self.port}{browser_path}", lambda m, p: None)
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
def running_chromium(exe: str) -> Iterator[Chromium]:
    browser = Chromium(exe)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="session")
def chromium() -> Iterator[Chromium]:
    """One headless chromium for the session; skipped without one, unless CI requires it."""
    exe = find_chromium()
    if exe is None:
        why = "chromium not found: apt-get install -y chromium, or set FLEETPUSH_CHROMIUM"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{why} ({REQUIRE_ENV}=1 requires the browser tests)", pytrace=False)
        pytest.skip(why)
    with running_chromium(exe) as browser:
        yield browser


@pytest.fixture
def page(chromium: Chromium, tmp_path: Path) -> Iterator[Page]:
    """A fresh tab; its screenshots go to ``tmp_path``."""
    tab = chromium.new_page(tmp_path)
    try:
        yield tab
    finally:
        tab.close()
