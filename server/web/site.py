"""The dashboard as an ASGI app: sign-in, sessions, CSRF, routes, actions, live streams.

Every route but ``/login`` and the static assets needs a web session
(login.py): a page without one redirects to ``/login``; an action, a live
stream or anything else is refused (401/403). Every POST also needs the
session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``), and a
cross-site ``Origin`` is refused outright; the session cookie is
SameSite=Strict besides. Pages and actions call the operator methods'
handlers through :class:`~.ops.Operations`, so each action is audited under
the operator's name exactly as from the CLI.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final

import trio
from fleetpush.protocol import FleetpushError, RpcError
from fleetpush.protocol.deployments import DeployCreate, DeployFilter, DeployRef, DeployShow
from fleetpush.protocol.messages import (
    AppControl,
    AppLogs,
    DeviceFilter,
    EventFilter,
    GetDevice,
    ReleaseFilter,
    SetReleaseStatus,
)
from fleetpush.protocol.p2p_view import P2PQuery

from . import live, render
from .chart import VersionHistory
from .http import (
    SESSION_COOKIE,
    BodyTooLarge,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    read_request,
    redirect,
    session_cookie,
    text,
)
from .login import SESSION_IDLE, LoginError, SessionStore, WebSession, check_token, csrf_ok
from .ops import SORTS, Operations

log = logging.getLogger("fleetpush.server.web")

PAGE: Final = 50
#: Update states a device reports when an update did not take (§7.6).
FAILED_STATES: Final = frozenset({"failed", "rolled_back"})
STATIC_TYPES: Final = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                       ".png": "image/png", ".svg": "image/svg+xml"}

#: A device's live log stream (a device may be called "logs": its page is /devices/logs).
LOGS: Final = re.compile(r"/devices/(?P<id>[^/]+)/logs")

Handler = Callable[[Request, WebSession, re.Match[str]], Awaitable[Response]]


class Dashboard:
    """The ASGI app (``await dashboard(scope, receive, send)``)."""

    def __init__(
        self,
        ops: Operations,
        *,
        history: VersionHistory | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.ops = ops
        self.history = history if history is not None else VersionHistory()
        self.sessions = SessionStore()
        self.streams = live.StreamBudget()
        self._now = now
        get, post = "GET", "POST"
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = [
            (get, re.compile(r"/"), self.fleet),
            (get, re.compile(r"/devices"), self.devices),
            (get, re.compile(r"/devices/(?P<id>[^/]+)"), self.device),
            (post, re.compile(r"/devices/(?P<id>[^/]+)/app"), self.app_control),
            (get, re.compile(r"/releases"), self.releases),
            (post, re.compile(r"/releases/status"), self.release_status),
            (get, re.compile(r"/releases/(?P<app>[^/]+)/(?P<version>[^/]+)"), self.release),
            (get, re.compile(r"/deployments"), self.deployments),
            (post, re.compile(r"/deployments"), self.deploy_create),
            (get, re.compile(r"/deployments/(?P<id>[^/]+)"), self.deployment),
            (post, re.compile(r"/deployments/(?P<id>[^/]+)"), self.deploy_action),
            (post, re.compile(r"/logout"), self.logout),
        ]

    # --- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            request = await read_request(scope, receive)
        except BodyTooLarge:
            await text(413, "request body too large").send(send)
            return
        if request.path == "/live" or LOGS.fullmatch(request.path):
            try:
                await self.stream(request, receive, send)
            except Exception:
                # The stream's head is sent already: log it and end this stream only.
                log.exception("web stream %s failed", request.path)
            return
        try:
            started = time.perf_counter()
            response = await self.dispatch(request)
            # The server's own time for the page (scripts/web_bench.py reads it).
            spent = (time.perf_counter() - started) * 1000
            response.headers.append((b"server-timing", f"app;dur={spent:.2f}".encode()))
        except Exception:
            # One bad request never takes the dashboard (or the releaser) down.
            log.exception("web request %s %s failed", request.method, request.path)
            response = text(500, "internal error (see the releaser's log)")
        await response.send(send)

    async def dispatch(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/static/"):
            return _static(path.removeprefix("/static/"))
        if path == "/favicon.ico":
            return Response(status=204)  # browsers ask for one; there is none
        if path == "/login":
            return await self.login(request)
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE), now=self._now())
        if request.method == "POST":
            refused = self._check_post(request, session)
            if refused is not None:
                return refused
        if session is None:
            if request.method == "GET":
                return redirect("/login")
            return text(401, "sign in first")
        for method, pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if match is not None and method == request.method:
                return await handler(request, session, match)
        return text(404, "no such page")

    def _check_post(self, request: Request, session: WebSession | None) -> Response | None:
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin.split("://", 1)[-1] != host:
            return text(403, "cross-site request refused")
        if session is None:
            return text(403, "sign in first")
        sent = request.form.get("csrf") or request.headers.get("x-csrf-token")
        if not csrf_ok(session, sent):
            return text(403, "bad or missing CSRF token: reload the page")
        return None

    def _page(self, request: Request, session: WebSession, title: str, main: str,
              after: str = "") -> Response:
        """The page, or only its ``main`` for a live refresh (static/app.js)."""
        if request.headers.get("x-fragment") == "main":
            return Response(body=main.encode())
        html = render.page(title, main, operator=session.operator, csrf=session.csrf, after=after)
        return Response(body=html.encode())

    def _take_flash(self, session: WebSession, request: Request) -> str:
        if request.headers.get("x-fragment") == "main":
            return ""
        message, session.flash = session.flash, ""
        return message

    async def _act(
        self, session: WebSession, what: str, method: str, make: Callable[[], object]
    ) -> Any:
        """Run an operator method on ``make()``; its result, or None with the failure flashed."""
        try:
            result = await self.ops.call(session.operator, method, make())
        except (FleetpushError, ValueError, TypeError) as e:
            reason = e.message if isinstance(e, RpcError) else str(e)
            session.flash = f"failed: {what}: {reason}"
            return None
        return result

    # --- sign-in -------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        """GET shows the sign-in form (with a link's token, a button to use it); POST signs in.

        A link only fills the form: a link previewer or prefetcher that GETs
        it neither uses up the one-time token nor gets a session with it.
        """
        if request.method == "GET":
            token = request.q("token")
            name = None
            if token is not None:
                try:
                    name = check_token(token, self.ops.services.config.operator_keys,
                                       now=self._now()).label
                except LoginError as e:
                    return Response(status=403, body=render.login(str(e)).encode())
            return Response(body=render.login(token=token, name=name).encode())
        if request.method != "POST":
            return text(405, "GET or POST")
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            return text(403, "cross-site request refused")
        token = request.form.get("token")
        if not token:
            return Response(status=400, body=render.login("no login token").encode())
        if not request.trustworthy():
            # The cookie is Secure: over plain HTTP to another address the
            # browser would drop it and sign-in would loop back here silently.
            return Response(status=403, body=render.login(
                "a browser keeps no Secure session cookie over plain HTTP except from "
                "127.0.0.1 or localhost [serve the dashboard over TLS: drop --insecure]"
            ).encode())
        now = self._now()
        try:
            login = check_token(token, self.ops.services.config.operator_keys, now=now)
            session_id = secrets.token_urlsafe(32)
            self.sessions.login(login, now=now, session_id=session_id,
                                csrf=secrets.token_urlsafe(32))
        except LoginError as e:
            return Response(status=403, body=render.login(str(e)).encode())
        log.warning("web: %s signed in", login.label)
        self.ops.audit("web_login", login.label)
        response = redirect("/")
        response.headers.append(session_cookie(session_id, max_age=int(SESSION_IDLE)))
        return response

    async def logout(self, request: Request, session: WebSession, m: re.Match[str]) -> Response:
        sid = request.cookies.get(SESSION_COOKIE)
        if sid is not None:
            self.sessions.logout(sid)
        self.ops.audit("web_logout", session.operator)
        response = redirect("/login")
        response.headers.append(session_cookie("", max_age=0))
        return response

    # --- pages ---------------------------------------------------------------------------

    async def fleet(self, request: Request, session: WebSession, m: re.Match[str]) -> Response:
        call = self.ops.call
        status = await call(session.operator, "status", None)
        deps = await call(session.operator, "deploy_list",
                          DeployFilter(states=list(render.ACTIVE_DEPLOYMENTS), limit=20))
        events = await call(session.operator, "list_events",
                            EventFilter(kinds=["progress"], limit=200))
        failures = [e for e in events.events if e.data.get("state") in FAILED_STATES][:10]
        main = render.fleet(status, await self.ops.channel_counts(), deps.deployments, failures,
                            # the stored samples, then this very page's counts
                            samples=[*self.history.samples, (self._now(), status.by_version)],
                            message=self._take_flash(session, request))
        return self._page(request, session, "Fleet", main)

    async def devices(self, request: Request, session: WebSession, m: re.Match[str]) -> Response:
        filters = {f: request.q(f) for f in render.DEVICE_FILTERS}
        connected = {"yes": True, "no": False}.get((filters["connected"] or "").lower())
        after = request.q("after")
        prefix = filters["q"]
        sort = request.q("sort")
        if sort in SORTS and connected is None and prefix is None:
            given = request.q("offset") or "0"
            offset = int(given) if given.isdigit() else 0
            rows, more = await self.ops.sorted_devices(filters, sort, offset, PAGE)
            main = render.devices(rows, {**filters, "sort": sort}, None, None,
                                  self._take_flash(session, request),
                                  offsets=(offset, offset + PAGE if more else None))
            return self._page(request, session, "Devices", main)
        if prefix is not None and after is None:
            # A device id prefix: start the page just before the first id with it.
            after = prefix[:-1] + chr(max(ord(prefix[-1]) - 1, 0)) + "\U0010ffff"
        try:
            page = await self.ops.call(session.operator, "list_devices", DeviceFilter(
                app=filters["app"], group=filters["group"], state=filters["state"],
                version=filters["version"], connected=connected, after=after, limit=PAGE,
            ))
        except FleetpushError as e:
            return text(400, f"bad filter: {e}")
        rows = page.devices
        next_cursor = page.next
        if prefix is not None:
            kept = [d for d in rows if d.device_id.startswith(prefix)]
            if len(kept) < len(rows):
                next_cursor = None
            rows = kept
        main = render.devices(rows, filters, next_cursor, request.q("after"),
                              self._take_flash(session, request))
        return self._page(request, session, "Devices", main)

    async def device(self, request: Request, session: WebSession, m: re.Match[str]) -> Response:
        try:
            detail = await self.ops.call(session.operator, "get_device",
                                         GetDevice(device_id=m["id"], history=30))
        except FleetpushError as e:
            return text(404, f"no such device: {e}")
        # Reports against it as a LAN peer (§7.11, "Operator view").
        peer_view = await self.ops.call(session.operator, "p2p_view", P2PQuery(device_id=m["id"]))
        main = render.device(
            detail, session.csrf, self._take_flash(session, request), reports=peer_view.reports
        )
        logs = render.device_logs(m["id"], detail.device.connected)
        return self._page(request, session, f"Device {m['id']}", main, after=logs)

    async def releases(self, request: Request, session: WebSession, m: re.Match[str]) -> Response:
        app = request.q("app")
        try:
            page = await self.ops.call(session.operator, "list_releases", ReleaseFilter(
                app=app, after=request.q("after"), limit=PAGE))
        except FleetpushError as e:
            return text(400, f"bad filter: {e}")
        main = render.releases(page.releases, app, page.next, session.csrf,
                               self._take_flash(session, request))
        return self._page(request, session, "Releases", main)

    async def release(self, request: Request, session: WebSession, m: re.Match[str]) -> Response:
        try:
            detail = await self.ops.release(m["app"], m["version"])
        except FleetpushError as e:
            return text(404, f"no such release: {e}")
        main = render.release(detail, session.csrf, self._take_flash(session, request))
        return self._page(request, session, f"Release {m['app']} {m['version']}", main)

    async def deployments(self, request: Request, session: WebSession,
                          m: re.Match[str]) -> Response:
        deps = await self.ops.call(session.operator, "deploy_list", DeployFilter(limit=PAGE))
        main = render.deployments(deps.deployments, session.csrf,
                                  self._take_flash(session, request))
        return self._page(request, session, "Deployments", main)

    async def deployment(self, request: Request, session: WebSession,
                         m: re.Match[str]) -> Response:
        try:
            info = await self.ops.call(session.operator, "deploy_show",
                                       DeployShow(deployment_id=m["id"], limit=PAGE))
        except FleetpushError as e:
            return text(404, f"no such deployment: {e}")
        main = render.deployment(info, session.csrf, self._take_flash(session, request))
        return self._page(request, session, f"Deployment {m['id']}", main)

    # --- actions (POST, CSRF checked in dispatch) ------------------------------------------

    async def app_control(self, request: Request, session: WebSession,
                          m: re.Match[str]) -> Response:
        action = request.form.get("action", "")
        device_id = m["id"]
        result = await self._act(session, f"app {action}", "app_control",
                                 lambda: AppControl(action=action, devices=[device_id]))
        if result is not None:
            outcome = result.results[0]
            state = outcome.status.state if outcome.status is not None else "?"
            session.flash = (f"app {action}: {state}" if outcome.ok
                             else f"failed: app {action}: {outcome.error}")
        return redirect(f"/devices/{device_id}")

    async def release_status(self, request: Request, session: WebSession,
                             m: re.Match[str]) -> Response:
        f = request.form
        app, version, status = f.get("app", ""), f.get("version", ""), f.get("status", "")
        result = await self._act(session, f"{app} {version} -> {status}", "set_release_status",
                                 lambda: SetReleaseStatus(app=app, version=version, status=status))
        if result is not None:
            session.flash = f"{result.app} {result.version} is now {result.status}"
        back = f.get("back", "")
        # Only a path of this site: never an address an attacker put in the form.
        return redirect(back if back.startswith("/releases/") else "/releases")

    async def deploy_create(self, request: Request, session: WebSession,
                            m: re.Match[str]) -> Response:
        f = {k: v.strip() for k, v in request.form.items()}
        def params() -> DeployCreate:
            return DeployCreate(
                app=f.get("app", ""), version=f.get("version", ""),
                devices=[d.strip() for d in f.get("devices", "").split(",") if d.strip()],
                group=f.get("group") or None, all=f.get("all") == "1",
                phases=[p.strip() for p in f.get("phases", "").split(",") if p.strip()],
                max_concurrent=int(f.get("max_concurrent") or 0),
                halt_after_failures=(float(f["halt_after_failures"])
                                     if f.get("halt_after_failures") else None),
                device_timeout=float(f.get("device_timeout") or 900),
                min_executed=int(f.get("min_executed") or 1),
                on_halt=f.get("on_halt") or "pause",
            )

        info = await self._act(session, "new deployment", "deploy_create", params)
        if info is None:
            return redirect("/deployments")
        session.flash = f"deployment {info.deployment_id} created: {info.targets} device(s)"
        return redirect(f"/deployments/{info.deployment_id}")

    async def deploy_action(self, request: Request, session: WebSession,
                            m: re.Match[str]) -> Response:
        action = request.form.get("action", "")
        if action not in ("pause", "resume", "abort"):
            return text(400, "unknown deployment action")
        info = await self._act(session, f"deployment {action}", f"deploy_{action}",
                               lambda: DeployRef(deployment_id=m["id"]))
        if info is not None:
            session.flash = f"deployment {info.deployment_id} is {info.state}"
        return redirect(f"/deployments/{m['id']}")

    # --- live streams ----------------------------------------------------------------------

    async def stream(self, request: Request, receive: Receive, send: Send) -> None:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE), now=self._now())
        if session is None or request.method != "GET":
            await text(401, "sign in first").send(send)
            return
        if request.path == "/live":
            await live.events(self.ops.services.events, self.streams, receive, send)
            return
        match = LOGS.fullmatch(request.path)
        assert match is not None
        device_id = match["id"]

        async def follow(nursery: trio.Nursery, notify: live.Notify) -> Any:
            return await self.ops.call(session.operator, "app_logs",
                                AppLogs(device_id=device_id, lines=50, follow=True),
                                nursery=nursery, notify=notify)

        await live.logs(follow, self.streams, receive, send)


def _static(name: str) -> Response:
    suffix = name[name.rfind("."):] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in STATIC_TYPES:
        return text(404, "no such file")
    try:
        body = resources.files(__package__).joinpath("static", name).read_bytes()
    except OSError:
        return text(404, "no such file")
    # Assets are public (they hold no fleet data); cached an hour.
    response = Response(body=body, content_type=STATIC_TYPES[suffix])
    return response


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
