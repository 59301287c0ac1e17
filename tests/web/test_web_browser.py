"""The dashboard in a real browser: a releaser process, real agents, headless chromium.

Two ``fleetpush agent`` devices run the plain test app. Through the pages an
operator signs in with a login link, sees the fleet, lists and filters the
devices, opens one, restarts its app (the app's pid changes on the device),
watches another device's app stop without reloading, promotes a release
through its lifecycle, and creates a deployment that halts on the release
crashing, its phases and halt reason filling in live. Every page gets a
screenshot in the test's tmp_path. ``FLEETPUSH_SCREENSHOTS=DIR`` also copies
the fleet page there (README's docs/dashboard-fleet.png comes from it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio
from fp_agent import AgentDevice
from fp_browser import Page
from fp_releaser import publish
from fp_trees import app_release
from web_helpers import WebReleaser, token, web_releaser_process


async def run(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """A blocking browser call, off the trio thread."""
    return await trio.to_thread.run_sync(partial(fn, *args, **kw))


@asynccontextmanager
async def fleet(tmp_path: Path, count: int, *, crash: bool = False) -> AsyncIterator[
    tuple[WebReleaser, list[AgentDevice]]
]:
    """A releaser process with the dashboard, and ``count`` agents connected to it."""
    data = tmp_path / "data"
    cm = web_releaser_process(data)
    releaser = await run(cm.__enter__)
    devs = [
        AgentDevice(tmp_path / f"d{i}", releaser.port, device_id=f"d{i}") for i in range(count)
    ]
    try:
        for dev in devs:
            if crash:
                dev.root.mkdir(parents=True, exist_ok=True)
                Path(str(dev.status) + ".crash").write_text("")
            await dev.start_agent()
        for dev in devs:
            await dev.wait_owner()
        yield releaser, devs
    finally:
        for dev in devs:
            await dev.stop_agents()
        await run(cm.__exit__, None, None, None)


def text_is(selector: str, expected: str) -> str:
    """A JS condition: the element's text is ``expected``."""
    return (
        f"(e => e !== null && e.innerText.trim() === {json.dumps(expected)})"
        f"(document.querySelector({json.dumps(selector)}))"
    )


def sign_in(page: Page, web: str) -> None:
    page.goto(f"{web}/login?token={token()}")
    assert page.text("#sign-in").startswith("Sign in as ops (")
    page.click("#sign-in", wait_load=True)
    page.wait_for_selector("#total")
    assert page.eval("location.pathname") == "/"
    session = [c for c in page.cookies() if c.name == "fp_session"]
    # Secure cookies are kept on http://127.0.0.1 (a trustworthy origin).
    assert len(session) == 1 and session[0].http_only and session[0].secure, session
    assert session[0].same_site == "Strict"


async def test_sign_in_fleet_devices_and_app_control(tmp_path: Path, page: Page) -> None:
    with trio.fail_after(90):
        async with fleet(tmp_path, 2) as (releaser, devs):
            web = releaser.web
            await run(sign_in, page, web)
            await run(page.wait_for, text_is("#online", "2"), 10)
            assert await run(page.text, "#total") == "2"
            assert "stable\t2" in await run(page.text, "main")  # devices by channel
            await run(page.shot, "fleet")

            await run(page.click, 'nav a[href="/devices"]', wait_load=True)
            rows = await run(page.eval, "[...document.querySelectorAll('tr[data-device]')]"
                                        ".map(r => r.dataset.device)")
            assert rows == ["d0", "d1"]
            # Sorted by a column: the server sorts (the link says so, the header marks it).
            await run(page.click, 'th a[href*="sort=version"]', wait_load=True)
            assert "sort=version" in await run(page.eval, "location.search")
            assert "▾" in await run(page.text, 'th a[href*="sort=version"]')
            rows = await run(page.eval, "[...document.querySelectorAll('tr[data-device]')]"
                                        ".map(r => r.dataset.device)")
            assert rows == ["d0", "d1"]
            await run(page.fill, 'input[name="q"]', "d1")
            await run(page.click, "form.filters button", wait_load=True)
            rows = await run(page.eval, "[...document.querySelectorAll('tr[data-device]')]"
                                        ".map(r => r.dataset.device)")
            assert rows == ["d1"]
            await run(page.shot, "devices")

            # Open d0 and restart its app: the device runs a new process.
            await run(page.goto, f"{web}/devices")
            await run(page.click, 'tr[data-device="d0"] a', wait_load=True)
            assert await run(page.text, "#device-id") == "d0"
            await run(page.wait_for, text_is("#app-state", "running"), 10)
            # The live log panel shows the app's own lines (logs --follow).
            await run(page.wait_for, "document.querySelector('#log').textContent"
                                     ".includes('app 1.0.0')", 10)
            before = devs[0].app_pid()
            await run(page.click, 'button[value="restart"]', wait_load=True)
            await run(page.wait_for, "document.querySelector('.flash.ok') !== null", 10)
            assert "app restart: running" in await run(page.text, ".flash")
            # The new process writes its status file a moment after it starts.
            with trio.fail_after(10):
                while devs[0].app_pid() == before:
                    await trio.sleep(0.05)
            await run(page.shot, "device")

            # d1's app stops on the device: its open page shows it without a reload.
            await run(page.goto, f"{web}/devices/d1")
            await run(page.wait_for, text_is("#app-state", "running"), 10)
            await run(page.wait_for, "document.body.dataset.liveOpen === '1'", 10)
            await run(page.eval, "window.sentinel = 1")  # gone if the page reloaded
            ran = await devs[1].cli("app", "stop")
            assert ran.code == 0, ran
            await run(page.wait_for, text_is("#app-state", "stopped"), 5)
            assert await run(page.eval, "window.sentinel") == 1
            await run(page.shot, "device-live")
            await run(page.assert_clean)

            # The actions are in the audit history under the operator's name.
            await run(page.goto, f"{web}/devices/d0")
            history = await run(page.text, "main")
            assert "app_control" in history and "operator=ops (" in history


async def test_promote_a_release_and_a_deployment_that_halts(
    tmp_path: Path, page: Page
) -> None:
    with trio.fail_after(120):
        async with fleet(tmp_path, 2, crash=True) as (releaser, _devs):
            web = releaser.web
            publish(
                tmp_path / "data",
                app_release(tmp_path, "plain_app", "1.1.0", "crash-if-flagged"),
                "1.1.0",
                notes="crashes where flagged",
            )
            await run(sign_in, page, web)
            await run(page.goto, f"{web}/releases")
            row = 'tr[data-release="demo 1.1.0"]'
            assert await run(page.text, f"{row} .status") == "draft"
            # Illegal transitions are disabled, with the reason.
            reason = await run(
                page.eval, f"document.querySelector('{row} button[value=approved]').title"
            )
            assert reason == "draft -> approved is not allowed"
            await run(page.click, f"{row} button[value=pre-released]", wait_load=True)
            await run(page.wait_for, text_is(f"{row} .status", "pre-released"), 5)
            await run(page.click, f"{row} button[value=approved]", wait_load=True)
            await run(page.wait_for, text_is(f"{row} .status", "approved"), 5)
            await run(page.shot, "releases")

            await run(page.goto, f"{web}/deployments")
            for name, value in (("app", "demo"), ("version", "1.1.0"), ("max_concurrent", "1"),
                                ("halt_after_failures", "1"), ("phases", "1,100%")):
                await run(page.fill, f'#deploy-form input[name="{name}"]', value)
            await run(page.click, '#deploy-form input[name="all"]')
            await run(page.click, "#deploy-form button", wait_load=True)
            deployment_url = await run(page.eval, "location.href")
            assert "/deployments/" in deployment_url
            assert "created: 2 device(s)" in await run(page.text, ".flash")
            await run(page.eval, "window.sentinel = 1")
            # The device's update fails (the app crashes, the agent rolls back):
            # the deployment halts and the page says why, without a reload.
            await run(page.wait_for, text_is("#dep-state", "halted"), 60)
            assert "halt" in await run(page.text, "#halt-reason")
            assert await run(page.eval, "window.sentinel") == 1
            failed = await run(page.eval, "document.querySelector('[data-count=failed]')"
                                          ".innerText")
            assert failed == "1"
            await run(page.shot, "deployment-halted")
            # The fleet page shows the halted deployment and the failure.
            await run(page.goto, f"{web}/")
            await run(page.wait_for, "document.querySelector('.state-halted') !== null", 5)
            await run(page.wait_for, "document.querySelector('main').innerText"
                                     ".includes('rolled_back')", 10)
            shot = await run(page.shot, "fleet-halted")
            if os.environ.get("FLEETPUSH_SCREENSHOTS"):
                shutil.copy(shot, Path(os.environ["FLEETPUSH_SCREENSHOTS"]) / "fleet.png")
            await run(page.goto, deployment_url)
            await run(page.wait_for, text_is("#dep-state", "halted"), 5)
            # Resume is offered; pause is not (the deployment is halted).
            assert await run(page.eval, "document.querySelector('button[value=pause]').disabled")
            # The page asks before aborting: "no" keeps it halted, "yes" aborts it.
            await run(page.answer_dialogs, False)
            await run(page.click, "button[value=abort]")
            await run(page.wait_for, "document.readyState === 'complete'", 5)
            assert [(d.type, d.message) for d in page.dialogs] == [
                ("confirm", "Abort this deployment?")
            ]
            assert await run(page.text, "#dep-state") == "halted"
            await run(page.answer_dialogs, True)
            await run(page.click, "button[value=abort]", wait_load=True)
            await run(page.wait_for, text_is("#dep-state", "aborted"), 5)
