"""A small synchronous DevTools (CDP) client: one websocket per browser tab.

:class:`Page` drives one tab over its websocket (websocket-client): goto,
wait_for, eval, click, fill, select, press, text, cookies, screenshot. It
records console errors and failed requests so a test can assert the page had
none (:meth:`Page.assert_clean`), and answers the page's dialogs
(``confirm()``...) as told, recording them. Every wait is bounded; one that
runs out raises :class:`WaitTimeout` naming the condition or selector and the
page URL, after saving a screenshot in the page's artifacts folder.

tests/support/fp_browser.py starts chromium and hands out these pages.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import websocket

VIEWPORT = (1280, 900)
CALL_TIMEOUT = 10.0
POLL = 0.05


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
class Dialog:
    type: str  # "alert", "confirm", "prompt" or "beforeunload"
    message: str


@attrs.frozen(kw_only=True)
class FailedRequest:
    url: str
    status: int | None  # HTTP status >= 400, or None when the request never completed
    error: str


class DevToolsSocket:
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

    def send(self, method: str, **params: Any) -> None:
        """Send a command without waiting for its answer (from an event handler).

        Raises BrowserError when the socket fails.
        """
        message = {"id": next(self._ids), "method": method, "params": params}
        try:
            self._ws.send(json.dumps(message))
        except (OSError, websocket.WebSocketException) as e:
            raise BrowserError(f"{method}: DevTools connection failed: {e}") from e

    def close(self) -> None:
        with contextlib.suppress(OSError, websocket.WebSocketException):
            self._ws.close()


class Page:
    """One tab in its own browser context. Not thread-safe: one caller at a time."""

    def __init__(self, sock_url: str, artifacts: Path, dispose: Callable[[], None]) -> None:
        self.artifacts = artifacts
        self.console_errors: list[str] = []
        self.failed_requests: list[FailedRequest] = []
        self.dialogs: list[Dialog] = []
        self._dialog_answer: tuple[bool, str] = (True, "")
        self._dispose = dispose
        self._loads = 0
        self._shots = itertools.count(1)
        self._urls: dict[str, str] = {}
        self._sock = DevToolsSocket(sock_url, self._on_event)
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
        elif method == "Page.javascriptDialogOpening":
            # An open dialog blocks the page and every input event sent to it:
            # answer at once, and keep what it said for the test to check.
            self.dialogs.append(Dialog(type=params["type"], message=params["message"]))
            accept, text = self._dialog_answer
            self._sock.send("Page.handleJavaScriptDialog", accept=accept, promptText=text)
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
            if response.get("status", 0) >= 400 and not _implicit_favicon(params):
                failure = FailedRequest(
                    url=response["url"], status=response["status"],
                    error=response.get("statusText", ""),
                )  # fmt: skip
                self.failed_requests.append(failure)
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            url = self._urls.get(params["requestId"], "?")
            failure = FailedRequest(url=url, status=None, error=params.get("errorText", ""))
            self.failed_requests.append(failure)

    def answer_dialogs(self, accept: bool, prompt_text: str = "") -> None:
        """How to answer the page's alert/confirm/prompt dialogs (at first: accept)."""
        self._dialog_answer = (accept, prompt_text)

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

    def select(self, selector: str, value: str, timeout: float = 5.0) -> None:
        """Choose the option with ``value`` in a ``<select>`` (input and change events fire).

        Raises BrowserError when the select has no such option.
        """
        self.wait_for_selector(selector, timeout)
        sel, val = json.dumps(selector), json.dumps(value)
        found = self.eval(
            f"(e => {{ if (![...e.options].some(o => o.value === {val})) return false;"
            f" e.value = {val}; for (const t of ['input', 'change'])"
            f" e.dispatchEvent(new Event(t, {{bubbles: true}})); return true; }})"
            f"(document.querySelector({sel}))"
        )
        if not found:
            raise BrowserError(f"select {selector!r} on {self.url} has no option {value!r}")

    def press(self, key: str, *, wait_load: bool = False, timeout: float = 5.0) -> None:
        """Press Enter, Tab or Escape in the focused element (Enter submits its form).

        With ``wait_load``, also wait for the page it opens.
        """
        code, text = _KEYS[key]
        loads = self._loads
        for kind in ("keyDown", "keyUp"):
            self._sock.call(
                "Input.dispatchKeyEvent",
                type=kind, key=key, code=key, windowsVirtualKeyCode=code,
                text=text if kind == "keyDown" else "",
            )  # fmt: skip
        if wait_load:
            self._wait(lambda: self._loads > loads, f"the page opened by {key}", timeout)

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
        """A screenshot named "failure" and the page's HTML beside it (``.html``),
        or why there is none (never raises)."""
        try:
            shot = self.shot("failure")
            html = self.eval("document.documentElement.outerHTML")
        except BrowserError as e:
            return f"none ({e})"
        shot.with_suffix(".html").write_text(str(html))
        return shot

    def close(self) -> None:
        self._sock.close()
        self._dispose()


# Key name -> (Windows virtual key code, the text it types), for Input.dispatchKeyEvent.
_KEYS = {"Enter": (13, "\r"), "Tab": (9, ""), "Escape": (27, "")}


def _implicit_favicon(params: dict[str, Any]) -> bool:
    # Chromium asks every origin for /favicon.ico on its own (resource type
    # "Other"); a site without one is not a broken page.
    path = urllib.parse.urlsplit(params["response"]["url"]).path
    return params.get("type") == "Other" and path == "/favicon.ico"


def _cookie(c: dict[str, Any]) -> Cookie:
    return Cookie(
        name=c["name"], value=c["value"], domain=c["domain"], path=c["path"],
        http_only=c["httpOnly"], secure=c["secure"], same_site=c.get("sameSite"),
    )  # fmt: skip


def _remote_text(obj: dict[str, Any]) -> str:
    if "value" in obj:
        return str(obj["value"])
    return str(obj.get("description", obj.get("type", "?")))
