"""The little HTTP layer the dashboard needs on top of ASGI: requests, responses, cookies.

No framework: the dashboard has a dozen routes, and this keeps every byte it
sends visible here (security headers, cookie attributes) and its only
runtime dependency hypercorn, which serves it on trio (server/web/serve.py).
"""

from __future__ import annotations

import html
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import CookieError, SimpleCookie
from typing import Any, Final

import attrs

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Largest form body accepted (the deployment form is the biggest, far below this).
MAX_BODY: Final = 64 * 1024
SESSION_COOKIE: Final = "fp_session"

#: Sent with every answer: no framing by other sites, no sniffing, scripts and
#: styles only from the releaser itself (no CDN, issue 16).
SECURITY_HEADERS: Final = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer makes a form's Origin "null"
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"frame-ancestors 'none'; form-action 'self'",
    ),
    (b"cache-control", b"no-store"),
)


class BodyTooLarge(Exception):
    """A request body beyond :data:`MAX_BODY` (answered 413)."""


@attrs.define
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    cookies: dict[str, str]
    form: dict[str, str] = attrs.field(factory=dict)
    #: "http" or "https", as the connection came in
    scheme: str = "http"

    def trustworthy(self) -> bool:
        """Whether a browser keeps a Secure cookie from here: HTTPS, or plain HTTP to loopback."""
        if self.scheme == "https":
            return True
        host = self.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in ("localhost", "[::1]") or name.startswith("127.")

    def q(self, name: str) -> str | None:
        """A query parameter, None when absent or empty."""
        value = self.query.get(name, "").strip()
        return value or None


async def read_request(scope: Scope, receive: Receive) -> Request:
    """The request's line, headers, cookies and (for a POST) its urlencoded form.

    Raises :class:`BodyTooLarge`.
    """
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    cookies: dict[str, str] = {}
    if "cookie" in headers:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(headers["cookie"])
        except CookieError:  # a malformed cookie header is no session, not an error page
            jar = SimpleCookie()
        cookies = {k: m.value for k, m in jar.items()}
    query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    request = Request(
        method=scope["method"], path=scope["path"], query=query, headers=headers,
        cookies=cookies, scheme=scope.get("scheme", "http"),
    )
    if request.method == "POST":
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = bool(message.get("more_body"))
            if len(body) > MAX_BODY:
                raise BodyTooLarge
        request.form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
    return request


@attrs.define
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[bytes, bytes]] = attrs.field(factory=list)

    async def send(self, send: Send) -> None:
        headers = [
            (b"content-type", self.content_type.encode()),
            (b"content-length", str(len(self.body)).encode()),
            *SECURITY_HEADERS,
            *self.headers,
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def redirect(location: str, *, status: int = 303) -> Response:
    return Response(status=status, headers=[(b"location", location.encode())])


def text(status: int, message: str) -> Response:
    return Response(status=status, body=message.encode(), content_type="text/plain; charset=utf-8")


def session_cookie(value: str, *, max_age: int) -> tuple[bytes, bytes]:
    """The session cookie: HttpOnly (no script reads it), Secure, SameSite=Strict.

    Secure on plain http: browsers accept Secure cookies from http://127.0.0.1
    and localhost (they are "potentially trustworthy" origins), which is the
    only place the dashboard serves plain HTTP without TLS worth the name.
    """
    return (
        b"set-cookie",
        f"{SESSION_COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; "
        "SameSite=Strict".encode(),
    )


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def url(path: str, **params: object) -> str:
    """``path`` with the non-empty ``params`` as its query string."""
    kept = {k: str(v) for k, v in params.items() if v not in (None, "")}
    return path + ("?" + urllib.parse.urlencode(kept) if kept else "")
