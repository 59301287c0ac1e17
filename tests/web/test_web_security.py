"""The dashboard's doors: sign-in, sessions, CSRF, and the audit trail of its actions.

A real releaser (``serve`` with ``http`` set) on 127.0.0.1 port 0, spoken to
over real HTTP; the audit check reads the history with the real ``fleetpush
events`` command in a subprocess, as an operator would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
from fleetpush.protocol.keys import keyid, private_key_to_pem, public_bytes
from fleetpush.server.web.login import (
    LoginError,
    SessionStore,
    check_token,
    make_token,
)
from fp_keys import OPERATOR_KEY, RELEASE_KEY, fixed_key
from fp_releaser import publish, releaser
from fp_trees import make_tree
from web_helpers import request, sign_in, token

FLEETPUSH = str(Path(sys.executable).with_name("fleetpush"))
OPS_LABEL = f"ops ({public_bytes(OPERATOR_KEY).hex()[:16]})"

#: Every route, and what it does without a session: a page sends the browser
#: to /login (showing nothing); anything else is refused outright.
ROUTES = [
    ("GET", "/", 303),
    ("GET", "/devices", 303),
    ("GET", "/devices/dev-1", 303),
    ("GET", "/releases", 303),
    ("GET", "/deployments", 303),
    ("GET", "/deployments/abc", 303),
    ("GET", "/nowhere", 303),
    ("GET", "/live", 401),
    ("GET", "/devices/dev-1/logs", 401),
    ("POST", "/devices/dev-1/app", 403),
    ("POST", "/releases/status", 403),
    ("POST", "/deployments", 403),
    ("POST", "/deployments/abc", 403),
    ("POST", "/logout", 403),
]


async def test_every_route_without_a_session_is_refused(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with releaser(tmp_path / "data", http="127.0.0.1:0") as handle:
            base = handle.http_url
            assert base is not None and base.startswith("http://127.0.0.1:")
            for cookie in (None, "forged-session-id"):
                for method, path, refused in ROUTES:
                    form = {"csrf": "x", "action": "restart"} if method == "POST" else None
                    answer = await trio.to_thread.run_sync(
                        partial(request, base, path, method=method, form=form, session=cookie)
                    )
                    assert answer.status == refused, (method, path, cookie, answer)
                    if refused == 303:
                        assert answer.headers["location"] == "/login"
                    assert "fleetpush" not in answer.body or path == "/login"
            # The login page and the assets answer without a session, with no fleet data.
            login = await trio.to_thread.run_sync(lambda: request(base, "/login"))
            assert login.status == 200 and "Sign in" in login.body
            js = await trio.to_thread.run_sync(lambda: request(base, "/static/app.js"))
            assert js.status == 200 and js.headers["content-type"].startswith("text/javascript")


async def test_sessions_cookies_and_csrf(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with releaser(tmp_path / "data", http="127.0.0.1:0") as handle:
            base = handle.http_url
            assert base is not None
            link = token()
            # Opening the link only shows a button: a previewer that fetches
            # it neither uses the token up nor gets a session.
            shown = await trio.to_thread.run_sync(lambda: request(base, f"/login?token={link}"))
            assert shown.status == 200 and not shown.cookie()
            assert f"Sign in as {OPS_LABEL}" in shown.body
            first = await trio.to_thread.run_sync(
                partial(request, base, "/login", method="POST", form={"token": link})
            )
            cookie_header = first.headers["set-cookie"]
            for attr in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
                assert attr in cookie_header, cookie_header
            session = first.cookie()
            assert session

            # Over plain HTTP to another address the Secure cookie would be dropped:
            # the login page says so instead of looping (the token is not used up).
            lan = await trio.to_thread.run_sync(
                partial(request, base, "/login", method="POST", form={"token": token()},
                        headers={"host": "192.0.2.7:8080"})
            )  # fmt: skip
            assert lan.status == 403 and "drop --insecure" in lan.body and not lan.cookie()

            # A login link works once.
            again = await trio.to_thread.run_sync(
                partial(request, base, "/login", method="POST", form={"token": link})
            )
            assert again.status == 403 and "used already" in again.body

            page = await trio.to_thread.run_sync(lambda: request(base, "/", session=session))
            assert page.status == 200 and OPS_LABEL in page.body
            csrf = page.csrf()
            for header in ("content-security-policy", "x-frame-options"):
                assert header in page.headers

            # A forged, a missing and another session's CSRF token are refused.
            other = await trio.to_thread.run_sync(lambda: sign_in(base))
            other_page = await trio.to_thread.run_sync(lambda: request(base, "/", session=other))
            for sent in ("forged", None, other_page.csrf()):
                form = {"app": "demo", "version": "1.0.0", "status": "approved"}
                if sent is not None:
                    form["csrf"] = sent
                answer = await trio.to_thread.run_sync(
                    partial(request, base, "/releases/status", method="POST", form=form,
                            session=session)
                )  # fmt: skip
                assert answer.status == 403 and "CSRF" in answer.body, (sent, answer)
            # The right token from another site's page is refused too (Origin).
            answer = await trio.to_thread.run_sync(
                lambda: request(base, "/logout", method="POST", form={"csrf": csrf},
                                session=session, headers={"origin": "http://evil.example"})
            )  # fmt: skip
            assert answer.status == 403 and "cross-site" in answer.body

            # Sign out: the session is gone.
            out = await trio.to_thread.run_sync(
                lambda: request(base, "/logout", method="POST", form={"csrf": csrf},
                                session=session)
            )  # fmt: skip
            assert out.status == 303 and out.headers["location"] == "/login"
            after = await trio.to_thread.run_sync(lambda: request(base, "/", session=session))
            assert after.status == 303 and after.headers["location"] == "/login"


async def test_an_action_from_the_web_is_in_fleetpush_events_under_the_operator(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        data = tmp_path / "data"
        publish(data, make_tree(tmp_path / "src", {"a.bin": 1000}), "1.0.0", notes="first")
        async with releaser(data, http="127.0.0.1:0") as handle:
            base = handle.http_url
            assert base is not None
            session = await trio.to_thread.run_sync(lambda: sign_in(base))
            page = await trio.to_thread.run_sync(
                lambda: request(base, "/releases", session=session)
            )
            assert "first" in page.body and 'value="approved" disabled' in page.body, page.body
            assert "draft -&gt; approved is not allowed" in page.body
            answer = await trio.to_thread.run_sync(
                lambda: request(base, "/releases/status", method="POST", session=session,
                                form={"csrf": page.csrf(), "app": "demo", "version": "1.0.0",
                                      "status": "pre-released"})
            )  # fmt: skip
            assert answer.status == 303, answer
            shown = await trio.to_thread.run_sync(
                lambda: request(base, "/releases", session=session)
            )
            assert "demo 1.0.0 is now pre-released" in shown.body
            # The release's own page: its signers' key ids, files and lifecycle.
            detail = await trio.to_thread.run_sync(
                lambda: request(base, "/releases/demo/1.0.0", session=session)
            )
            assert detail.status == 200
            assert keyid(RELEASE_KEY)[:16] in detail.body and "a.bin" in detail.body
            assert f"pre-released</td><td>{OPS_LABEL}" in detail.body

            # The same change from the CLI, then both in the audit history.
            key = tmp_path / "operator.key"
            key.write_bytes(private_key_to_pem(OPERATOR_KEY))
            console = ["--insecure", "--server", f"127.0.0.1:{handle.port}",
                       "--operator-key", str(key), "--name", "ops"]  # fmt: skip
            done = await trio.run_process(
                [FLEETPUSH, "release", "promote", "demo", "1.0.0", "approved", *console],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            done = await trio.run_process(
                [FLEETPUSH, "events", "--type", "release_status", "--json", *console],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            events = json.loads(done.stdout)
            by_status = {e["data"]["status"]: e["data"]["operator"] for e in events}
            assert by_status == {"pre-released": OPS_LABEL, "approved": OPS_LABEL}, events
            # Signing in to the dashboard is in the history too.
            done = await trio.run_process(
                [FLEETPUSH, "events", "--type", "web_login", "--json", *console],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert [e["data"]["operator"] for e in json.loads(done.stdout)] == [OPS_LABEL]


async def test_the_web_login_command_makes_a_working_link(tmp_path: Path) -> None:
    with trio.fail_after(30):
        key = tmp_path / "operator.key"
        key.write_bytes(private_key_to_pem(OPERATOR_KEY))
        async with releaser(tmp_path / "data", http="127.0.0.1:0") as handle:
            base = handle.http_url
            assert base is not None
            done = await trio.run_process(
                [FLEETPUSH, "operator", "web-login", "--operator-key", str(key), "--name",
                 "alice", "--url", base + "/"],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            link = done.stdout.decode().strip()
            assert link.startswith(base + "/login?token=")
            path = link.removeprefix(base)
            shown = await trio.to_thread.run_sync(lambda: request(base, path))
            assert shown.status == 200 and "Sign in as alice (" in shown.body
            sent = path.split("token=", 1)[1]
            answer = await trio.to_thread.run_sync(
                partial(request, base, "/login", method="POST", form={"token": sent})
            )
            assert answer.status == 303 and answer.cookie()
            page = await trio.to_thread.run_sync(
                lambda: request(base, "/", session=answer.cookie())
            )
            assert f"alice ({public_bytes(OPERATOR_KEY).hex()[:16]})" in page.body

            # Without a key: one line naming what to do.
            done = await trio.run_process(
                [FLEETPUSH, "operator", "web-login", "--config", str(tmp_path / "none.toml")],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            err = done.stderr.decode().strip().splitlines()
            assert done.returncode != 0 and len(err) == 1 and err[0].startswith("fleetpush: ")


def test_the_dashboard_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [FLEETPUSH, "server", "--data-dir", str(tmp_path / "data"), "--listen",
             "127.0.0.1:0", "--http", f"127.0.0.1:{port}", "--insecure"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if "--insecure" not in line]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "cannot serve the dashboard" in lines[0], done.stderr


NOW = 1_800_000_000.0
KEYS = [public_bytes(OPERATOR_KEY)]
STRANGER = fixed_key(0x77)

#: Login tokens the releaser must refuse, and the words of the refusal.
REFUSED = {
    "a token signed by a key that is no operator's": (
        lambda: make_token(STRANGER, "ops", now=NOW, nonce=b"n" * 16), "not an operator key"),
    "an expired token": (
        lambda: make_token(OPERATOR_KEY, "ops", now=NOW - 700, nonce=b"n" * 16), "expired"),
    "a token whose claims were changed after signing": (
        lambda: _tampered(), "does not verify"),
    "garbage": (lambda: "not-a-token", "malformed"),
    "an empty name": (
        lambda: make_token(OPERATOR_KEY, "", now=NOW, nonce=b"n" * 16), "names no operator"),
}


def _tampered() -> str:
    import base64

    good = make_token(OPERATOR_KEY, "ops", now=NOW, nonce=b"n" * 16)
    head, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    claims["name"] = "root"
    forged = base64.urlsafe_b64encode(
        json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    ).rstrip(b"=").decode()
    return f"{forged}.{sig}"


@pytest.mark.parametrize("case", list(REFUSED))
def test_login_tokens_refused(case: str) -> None:
    make, words = REFUSED[case]
    with pytest.raises(LoginError, match=words):
        check_token(make(), KEYS, now=NOW)


def test_a_login_token_opens_one_session_only() -> None:
    login = check_token(make_token(OPERATOR_KEY, "ops", now=NOW, nonce=b"x" * 16), KEYS, now=NOW)
    assert login.label == OPS_LABEL
    store = SessionStore()
    session = store.login(login, now=NOW, session_id="s1", csrf="c1")
    assert store.get("s1", now=NOW + 1) is session
    with pytest.raises(LoginError, match="used already"):
        store.login(login, now=NOW + 2, session_id="s2", csrf="c2")
    assert store.get("s2", now=NOW + 2) is None
    assert store.get("s1", now=NOW + 9 * 3600) is None  # idle too long


async def test_the_dashboard_serves_tls_with_the_releasers_certificate(tmp_path: Path) -> None:
    import http.client
    import ssl

    from fleetpush.net.tls import make_pki

    pki = make_pki(tmp_path / "pki")

    def get(url: str, path: str) -> tuple[int, str]:
        host, port = url.removeprefix("https://").rsplit(":", 1)
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    with trio.fail_after(30):
        async with releaser(
            tmp_path / "data", http="127.0.0.1:0",
            tls_cert=pki["server_cert"], tls_key=pki["server_key"],
        ) as handle:  # fmt: skip
            base = handle.http_url
            assert base is not None and base.startswith("https://127.0.0.1:")
            status, body = await trio.to_thread.run_sync(get, base, "/login")
            assert status == 200 and "Sign in" in body
            # Plain HTTP to the same port gets no page.
            plain = base.replace("https://", "http://")
            with pytest.raises((http.client.HTTPException, OSError)):
                await trio.to_thread.run_sync(lambda: request(plain, "/login"))


def test_the_versions_chart_draws_a_line_per_version_and_sums_the_rest() -> None:
    from fleetpush.server.web.chart import LINES, VersionHistory, svg

    history = VersionHistory(keep=3)
    for i in range(5):
        history.add(NOW + 60 * i, {f"1.{v}.0": 10 * v + i for v in range(LINES + 2)})
    samples = list(history.samples)
    assert len(samples) == 3  # only the newest are kept
    drawn = svg(samples)
    assert drawn.count("<polyline") == LINES + 1  # the largest versions, and "other"
    assert ">other</text>" in drawn and ">1.7.0</text>" in drawn and ">1.0.0</text>" not in drawn
    assert "no samples" in svg([])


async def test_a_live_stream_relays_events_and_unsubscribes_when_the_browser_goes(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with releaser(tmp_path / "data", http="127.0.0.1:0") as handle:
            base = handle.http_url
            assert base is not None
            session = await trio.to_thread.run_sync(lambda: sign_in(base))
            hub = handle.services.events
            before = hub.watchers
            port = int(base.rsplit(":", 1)[1])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(
                f"GET /live HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Cookie: fp_session={session}\r\n\r\n".encode()
            )
            got = b""
            while b": open" not in got:
                got += await stream.receive_some(4096)
            assert b"text/event-stream" in got and hub.watchers == before + 1
            hub.emit("app_status", "dev-9", {"state": "stopped"})
            while b"data: " not in got:
                got += await stream.receive_some(4096)
            message = json.loads(got.split(b"data: ", 1)[1].split(b"\n", 1)[0])
            assert message["devices"] == ["dev-9"] and message["kinds"] == ["app_status"]
            await stream.aclose()
            while hub.watchers != before:  # bounded by fail_after
                await trio.sleep(0.05)
