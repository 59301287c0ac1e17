"""Helpers of the dashboard tests: a plain HTTP client, login links, a releaser process.

A unique module name (conftest is not importable by name), found through
pytest's rootdir-relative import of this folder.
"""

from __future__ import annotations

import http.client
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.server.web.login import make_token
from fp_keys import OPERATOR_KEY, key_hex


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: str

    def cookie(self) -> str | None:
        """The session cookie's value this answer sets, if any."""
        m = re.match(r"fp_session=([^;]*)", self.headers.get("set-cookie", ""))
        return m.group(1) if m else None

    def csrf(self) -> str:
        m = re.search(r'name="csrf" value="([^"]+)"', self.body)
        assert m is not None, self.body[:500]
        return m.group(1)


def request(
    base: str,
    path: str,
    *,
    method: str = "GET",
    form: dict[str, str] | None = None,
    session: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Answer:
    """One HTTP request to the dashboard at ``base`` (redirects are not followed)."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        sent = dict(headers or {})
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            sent["content-type"] = "application/x-www-form-urlencoded"
        if session is not None:
            sent["cookie"] = f"fp_session={session}"
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        return Answer(
            resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
        )
    finally:
        conn.close()


def token(key: Ed25519PrivateKey = OPERATOR_KEY, name: str = "ops", ttl: float = 600.0) -> str:
    return make_token(key, name, now=time.time(), nonce=secrets.token_bytes(16), ttl=ttl)


def sign_in(base: str, name: str = "ops") -> str:
    """A fresh web session's cookie value, signed in with a login link."""
    answer = request(base, "/login", method="POST", form={"token": token(name=name)})
    assert answer.status == 303 and answer.headers["location"] == "/", answer
    cookie = answer.cookie()
    assert cookie
    return cookie


@attrs.frozen
class WebReleaser:
    proc: subprocess.Popen[str]
    port: int
    web: str  # the dashboard's base URL


@contextmanager
def web_releaser_process(data_dir: Path, *extra: str) -> Iterator[WebReleaser]:
    """A real ``fleetpush server --http 127.0.0.1:0`` process, stopped with SIGTERM."""
    proc = subprocess.Popen(
        [
            sys.executable, "-P", "-m", "fleetpush.cli.main", "server",
            "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
            "--insecure", "--operator-key", key_hex(OPERATOR_KEY), "--grace-period", "1", *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        web = None
        for _ in range(20):
            line = proc.stdout.readline()
            if line.startswith("web dashboard on "):
                web = line.split()[-1]
            if line.startswith("listening on") or not line:
                break
        assert web is not None and line.startswith("listening on"), "the releaser did not start"
        yield WebReleaser(proc, int(line.rsplit(":", 1)[1]), web)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
