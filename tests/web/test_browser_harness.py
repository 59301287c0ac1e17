"""The browser harness itself (tests/support/fp_browser.py), against a tiny local site.

The site is served by a real ``http.server`` on 127.0.0.1 port 0 in a thread,
and driven through a real headless chromium.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio
from fp_browser import BrowserError, Chromium, Dialog, Page, WaitTimeout

HOME = b"""<!doctype html>
<html><head><title>harness</title></head><body>
<h1>Harness</h1>
<button id="go" onclick="document.querySelector('#out').textContent = 'clicked'">go</button>
<p id="out">waiting</p>
<input id="name" oninput="document.querySelector('#echo').textContent = this.value">
<p id="echo"></p>
<button id="later"
  onclick="setTimeout(() => document.body.dataset.late = 'yes', 200)">later</button>
<button id="boom"
  onclick="console.error('boom from the page'); throw new Error('kaboom')">x</button>
<button id="ask"
  onclick="document.querySelector('#answer').textContent = confirm('Sure?') ? 'yes' : 'no'"
  >ask</button>
<p id="answer"></p>
<form action="/next"><input id="q" name="q"><select id="kind" name="kind">
  <option value="all">all</option><option value="offline">offline</option></select></form>
<a id="next" href="/next">next</a>
</body></html>
"""
NEXT = b"<!doctype html><html><head><title>next</title></head><body><h1>Next</h1></body></html>"


class _Site(BaseHTTPRequestHandler):
    seen: list[str] = []  # the paths asked for, in order

    def do_GET(self) -> None:
        self.seen.append(self.path)
        path = urllib.parse.urlsplit(self.path).path
        if path == "/":
            cookies = ["sid=s3cret; HttpOnly; SameSite=Strict; Path=/", "seen=1; Path=/"]
            self._send(200, HOME, cookies)
        elif path == "/next":
            self._send(200, NEXT)
        else:
            self._send(404, b"not here")

    def _send(self, status: int, body: bytes, cookies: list[str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for cookie in cookies or []:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output to the test's own


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_goto_reads_the_page_and_it_is_clean(page: Page, site: str) -> None:
    page.goto(site + "/")
    assert page.text("h1") == "Harness"
    assert page.eval("document.title") == "harness"
    assert page.url == site + "/"
    # The site has no /favicon.ico: chromium's own request for it, answered
    # 404, is not the page's failure.
    deadline = time.monotonic() + 10
    while "/favicon.ico" not in _Site.seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "/favicon.ico" in _Site.seen
    page.wait_for("true")  # read the events of that request
    page.assert_clean()


def test_click_runs_the_page_script(page: Page, site: str) -> None:
    page.goto(site + "/")
    page.click("#go")
    page.wait_for("document.querySelector('#out').textContent === 'clicked'")
    assert page.text("#out") == "clicked"


def test_wait_for_a_later_change(page: Page, site: str) -> None:
    page.goto(site + "/")
    page.click("#later")
    page.wait_for("document.body.dataset.late === 'yes'", timeout=5)
    assert page.eval("document.body.dataset.late") == "yes"


def test_fill_types_into_an_input(page: Page, site: str) -> None:
    page.goto(site + "/")
    page.fill("#name", "old")
    page.fill("#name", "device-7")
    assert page.eval("document.querySelector('#name').value") == "device-7"
    assert page.text("#echo") == "device-7"


def test_select_and_enter_submit_a_form(page: Page, site: str) -> None:
    page.goto(site + "/")
    page.select("#kind", "offline")
    page.fill("#q", "d1")
    page.press("Enter", wait_load=True)
    assert page.url == site + "/next?q=d1&kind=offline"
    assert page.text("h1") == "Next"


def test_selecting_a_missing_option_is_an_error(page: Page, site: str) -> None:
    page.goto(site + "/")
    with pytest.raises(BrowserError, match=r"'#kind' on .* has no option 'gone'"):
        page.select("#kind", "gone")


def test_click_that_navigates_waits_for_the_new_page(page: Page, site: str) -> None:
    page.goto(site + "/")
    page.click("#next", wait_load=True)
    assert page.url == site + "/next"
    assert page.text("h1") == "Next"


def test_dialogs_are_answered_and_recorded(page: Page, site: str) -> None:
    page.goto(site + "/")
    page.click("#ask")
    page.wait_for("document.querySelector('#answer').textContent === 'yes'")
    page.answer_dialogs(accept=False)
    page.click("#ask")
    page.wait_for("document.querySelector('#answer').textContent === 'no'")
    assert page.dialogs == [Dialog(type="confirm", message="Sure?")] * 2


def test_httponly_cookie_is_read_over_cdp(page: Page, site: str) -> None:
    page.goto(site + "/")
    cookies = {c.name: c for c in page.cookies()}
    assert cookies["sid"].value == "s3cret"
    assert cookies["sid"].http_only
    assert cookies["sid"].same_site == "Strict"
    assert not cookies["seen"].http_only
    # The page's own script cannot see the HttpOnly one.
    assert page.eval("document.cookie") == "seen=1"


def test_each_page_has_its_own_cookies(chromium: Chromium, page: Page, site: str) -> None:
    page.goto(site + "/")
    assert page.cookies() != []
    other = chromium.new_page(page.artifacts)
    try:
        other.goto(site + "/next")
        assert other.cookies() == []
    finally:
        other.close()


def test_screenshot_is_a_png_of_the_viewport(page: Page, site: str) -> None:
    page.goto(site + "/")
    path = page.shot("home")
    assert path.parent == page.artifacts
    assert path.name == "01-home.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 900)


def test_a_wait_that_runs_out_names_the_selector_and_saves_a_screenshot(
    page: Page, site: str
) -> None:
    page.goto(site + "/")
    with pytest.raises(WaitTimeout) as caught:
        page.text("#never-there", timeout=0.3)
    message = str(caught.value)
    assert "'#never-there'" in message
    assert site + "/" in message
    shot = page.artifacts / "01-failure.png"
    assert f"screenshot: {shot}" in message
    assert shot.read_bytes()[:4] == b"\x89PNG"
    assert "<h1>Harness</h1>" in shot.with_suffix(".html").read_text()


def test_a_condition_that_never_holds_is_named(page: Page, site: str) -> None:
    page.goto(site + "/")
    with pytest.raises(WaitTimeout, match=r"condition 'window\.nope === 1'"):
        page.wait_for("window.nope === 1", timeout=0.2)


def test_console_errors_and_exceptions_are_collected(page: Page, site: str) -> None:
    page.goto(site + "/")
    page.click("#boom")
    page.wait_for("true")  # a round trip, so the events are read
    assert any("boom from the page" in e for e in page.console_errors)
    assert any("kaboom" in e for e in page.console_errors)
    with pytest.raises(AssertionError, match="console errors"):
        page.assert_clean()


def test_failed_requests_are_collected(page: Page, site: str) -> None:
    page.goto(site + "/")
    assert page.eval("fetch('/missing').then(r => r.status)") == 404
    page.wait_for("true")
    assert [(f.url, f.status) for f in page.failed_requests] == [(site + "/missing", 404)]
    with pytest.raises(AssertionError, match="failed requests"):
        page.assert_clean()


def test_a_refused_navigation_is_an_error(page: Page) -> None:
    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(BrowserError, match="ERR_CONNECTION_REFUSED"):
        page.goto(f"http://127.0.0.1:{port}/")


def test_a_throwing_script_is_an_error(page: Page) -> None:
    with pytest.raises(BrowserError, match="no such thing"):
        page.eval("(() => { throw new Error('no such thing'); })()")


async def test_the_page_from_a_trio_test(page: Page, site: str) -> None:
    with trio.fail_after(30):
        await trio.to_thread.run_sync(page.goto, site + "/")
        title = await trio.to_thread.run_sync(page.text, "h1")
    assert title == "Harness"
