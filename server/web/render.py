"""HTML of the dashboard's pages: pure functions from the operator methods' results to text.

Plain HTML, one stylesheet and one small script (static/), no inline script
or style (the Content-Security-Policy in http.py forbids both), so progress
bars are ``<progress>``/``<meter>`` elements. Every value from a device or an
operator goes through :func:`esc`. The part inside ``<main id="main">`` is
also what a live refresh fetches (``X-Fragment: main``), see static/app.js.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from fleetpush.protocol.messages import (
    DeploymentInfo,
    DeviceDetail,
    DeviceInfo,
    Event,
    ReleaseInfo,
    StatusResult,
)
from fleetpush.protocol.p2p_view import BadPeerReport

from ..releases import LIFECYCLE
from . import chart
from .chart import Sample
from .http import esc, url
from .ops import ReleaseDetail

NAV = (("/", "Fleet"), ("/devices", "Devices"), ("/releases", "Releases"),
       ("/deployments", "Deployments"))
#: The states a deployment is still doing (or may again do) something in.
ACTIVE_DEPLOYMENTS = ("running", "paused", "halted")
#: Release buttons, in lifecycle order: the status each sets and its label.
RELEASE_ACTIONS = (("pre-released", "pre-release"), ("approved", "approve"),
                   ("revoked", "revoke"))


def page(title: str, main: str, *, operator: str | None, csrf: str = "", live: bool = True,
         after: str = "") -> str:
    """A whole page around ``main`` (the live-refreshed part)."""
    nav = ""
    if operator is not None:
        links = "".join(f'<a href="{href}">{name}</a>' for href, name in NAV)
        nav = (
            f'<nav>{links}<span class="who">{esc(operator)}</span>'
            f'<form method="post" action="/logout">{csrf_field(csrf)}'
            '<button>Sign out</button></form></nav>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{esc(title)} · fleetpush</title>'
        '<link rel="stylesheet" href="/static/style.css">'
        '<script src="/static/app.js" defer></script></head>'
        f'<body><header><b>fleetpush</b>{nav}</header>'
        f'<main id="main"{" data-live" if live else ""}>{main}</main>{after}</body></html>'
    )


def csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(csrf)}">'


def flash(message: str) -> str:
    if not message:
        return ""
    kind = "error" if message.startswith("failed") else "ok"
    return f'<p class="flash {kind}" role="status">{esc(message)}</p>'


def when(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def login(error: str = "", *, token: str | None = None, name: str | None = None) -> str:
    """The sign-in page; with a link's verified token, one button that uses it."""
    err = f'<p class="flash error">{esc(error)}</p>' if error else ""
    if token is not None and name is not None:
        main = (
            f"<h1>Sign in</h1>{err}"
            '<form method="post" action="/login" id="login-form">'
            f'<input type="hidden" name="token" value="{esc(token)}">'
            f'<button id="sign-in">Sign in as {esc(name)}</button></form>'
            "<p class=hint>The link works once.</p>"
        )
    else:
        main = (
            f"<h1>Sign in</h1>{err}"
            "<p>Make a one-time login link with your operator key: "
            "<code>fleetpush operator web-login --url URL</code>, and open it, or paste its "
            "token here.</p>"
            '<form method="post" action="/login" id="login-form"><label>Login token '
            '<input name="token" autocomplete="off" required></label>'
            '<button id="sign-in">Sign in</button></form>'
        )
    return page("Sign in", main, operator=None, live=False)


def _table(head: Iterable[str], rows: Iterable[str], cls: str = "") -> str:
    """A table; a header already HTML (a sort link) is kept as it is."""
    th = "".join(f"<th>{h if h.startswith('<a ') else esc(h)}</th>" for h in head)
    body = "".join(rows) or f'<tr><td colspan="{len(list(head))}">none</td></tr>'
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{th}</tr></thead>' \
           f"<tbody>{body}</tbody></table></div>"


def _counts(title: str, counts: dict[str, int], total: int, link: str) -> str:
    rows = "".join(
        f"<tr><td>{_filter_link(link, k)}</td>"
        f'<td class="num">{n}</td><td><meter min="0" max="{max(total, 1)}" value="{n}">'
        f"</meter></td></tr>"
        for k, n in sorted(counts.items(), key=lambda kv: -kv[1])
    )
    return f'<section><h2>{esc(title)}</h2>{_table((title, "devices", ""), [rows])}</section>'


def _filter_link(name: str, value: str) -> str:
    """``value``, linked to the devices page filtered by it (when that filter exists)."""
    if not name:
        return esc(value)
    return f'<a href="{esc(url("/devices", **{name: value}))}">{esc(value)}</a>'


def deployment_progress(d: DeploymentInfo) -> str:
    done = sum(n for s, n in d.counts.items() if s not in ("pending", "active"))
    return (
        f'<progress max="{max(d.targets, 1)}" value="{done}" title="{done}/{d.targets}">'
        f"</progress> {done}/{d.targets}"
    )


def fleet(status: StatusResult, channels: dict[str, int], deployments: list[DeploymentInfo],
          failures: list[Event], *, samples: list[Sample], message: str) -> str:
    total = sum(status.by_version.values())
    cards = (
        f'<div class="cards"><div class="card"><b id="total">{total}</b> devices</div>'
        f'<div class="card"><b id="online">{status.connected}</b> online</div>'
        f'<div class="card"><b id="offline">{max(total - status.connected, 0)}</b> offline'
        f'</div><div class="card"><b>{len(deployments)}</b> active deployments</div></div>'
    )
    deps = _table(
        ("deployment", "release", "state", "progress"),
        (
            f'<tr><td><a href="/deployments/{esc(d.deployment_id)}">{esc(d.deployment_id)}'
            f'</a></td><td>{esc(d.app)} {esc(d.version)}</td><td class="state-{esc(d.state)}">'
            f"{esc(d.state)}</td><td>{deployment_progress(d)}</td></tr>"
            for d in deployments
        ),
    )
    fails = _table(
        ("time", "device", "state", "version", "error"),
        (
            f"<tr><td>{when(e.time)}</td><td>{_device_link(e.device_id)}</td>"
            f'<td>{esc(e.data.get("state"))}</td><td>{esc(e.data.get("version"))}</td>'
            f'<td>{esc(e.data.get("error"))}</td></tr>'
            for e in failures
        ),
    )
    return (
        f"{flash(message)}<h1>Fleet</h1>{cards}"
        f'<div class="grid">{_counts("version", status.by_version, total, "version")}'
        f'{_counts("state", status.by_state, total, "state")}'
        f'{_counts("channel", channels, total, "")}</div>'
        f"<section><h2>Active deployments</h2>{deps}</section>"
        f"<section><h2>Recent failures</h2>{fails}</section>"
        f"<section><h2>Versions over time</h2>{chart.svg(samples)}</section>"
    )


def _device_link(device_id: str | None) -> str:
    if device_id is None:
        return "-"
    return f'<a href="/devices/{esc(device_id)}">{esc(device_id)}</a>'


PLACEHOLDER = ' placeholder="yes / no"'
#: The filters of the devices page, in the order of its form.
DEVICE_FILTERS = ("app", "group", "version", "state", "connected", "q")


def devices(rows: list[DeviceInfo], filters: dict[str, str | None], next_cursor: str | None,
            after: str | None, message: str, *,
            offsets: tuple[int, int | None] | None = None) -> str:
    inputs = "".join(
        f'<label>{"search id" if f == "q" else f} <input name="{f}" '
        f'value="{esc(filters.get(f) or "")}"'
        f"{PLACEHOLDER if f == 'connected' else ''}></label>"
        for f in DEVICE_FILTERS
    )
    form = f'<form method="get" action="/devices" class="filters">{inputs}<button>Filter</button>' \
           '<a href="/devices">clear</a></form>'
    keep = {f: filters.get(f) for f in DEVICE_FILTERS}
    sorted_by = filters.get("sort")

    def head(label: str, sort: str | None) -> str:
        mark = " ▾" if sort == sorted_by else ""
        return f'<a href="{esc(url("/devices", **keep, sort=sort))}">{label}{mark}</a>'

    table = _table(
        (head("device", None), "app", head("version", "version"), head("state", "state"),
         "channel", "group", "online", "app status", head("last seen", "last_seen")),
        (
            f'<tr data-device="{esc(d.device_id)}"><td>{_device_link(d.device_id)}</td>'
            f"<td>{esc(d.app)}</td><td>{esc(d.version)}</td>"
            f'<td class="state">{esc(d.state)}</td><td>{esc(d.channel)}</td>'
            f'<td>{esc(d.group)}</td><td>{"yes" if d.connected else "no"}</td>'
            f'<td>{esc((d.app_status or {}).get("state", "-"))}</td>'
            f"<td>{when(d.last_seen)}</td></tr>"
            for d in rows
        ),
        "devices",
    )
    pager = []
    if offsets is not None:
        start, following = offsets
        if start:
            first = url("/devices", **keep, sort=sorted_by)
            pager.append(f'<a href="{esc(first)}">first page</a>')
        if following is not None:
            later = url("/devices", **keep, sort=sorted_by, offset=following)
            pager.append(f'<a rel="next" href="{esc(later)}">next page</a>')
    if after is not None:
        pager.append(f'<a href="{esc(url("/devices", **filters))}">first page</a>')
    if next_cursor is not None:
        pager.append(
            f'<a rel="next" href="{esc(url("/devices", **filters, after=next_cursor))}">'
            "next page</a>"
        )
    return (
        f"{flash(message)}<h1>Devices</h1>{form}{table}"
        f'<p class="pager">{" · ".join(pager)}</p>'
        "<p class=\"hint\">50 a page; sort by a column's title (the connected filter and "
        "the id search keep the device id order).</p>"
    )


def device(
    detail: DeviceDetail, csrf: str, message: str, reports: Iterable[BadPeerReport] = ()
) -> str:
    d = detail.device
    app = d.app_status or {}
    # Reported as a LAN peer serving a chunk that failed its digest (§7.11).
    bad = "; ".join(
        f"by {r.reporter} for {r.app} {r.version} ({r.reason}, {when(r.at)})" for r in reports
    )
    facts = [
        ("app", d.app), ("version", d.version), ("state", d.state), ("trial", d.trial_version),
        ("channel", d.channel), ("group", d.group), ("enrollment", d.enrollment),
        ("online", "yes" if d.connected else "no"), ("first seen", when(d.first_seen)),
        ("last seen", when(d.last_seen)), ("last result", d.last_result),
        ("state error", d.state_error), ("duplicate", d.duplicate),
        ("public key", d.public_key.hex()),
        ("bad peer", bad or None),
    ]
    dl = "".join(
        f'<dt>{esc(k)}</dt><dd data-fact="{esc(k)}">{esc(v if v is not None else "-")}</dd>'
        for k, v in facts
    )
    if d.bytes_total:
        dl += (f'<dt>download</dt><dd><progress max="{d.bytes_total}" value="{d.bytes_done}">'
               f"</progress></dd>")
    buttons = "".join(
        f'<button name="action" value="{a}"{"" if d.connected else " disabled"}>{a}</button>'
        for a in ("start", "stop", "restart")
    )
    control = (
        f'<section><h2>App</h2><p>status: <b id="app-state">{esc(app.get("state", "-"))}</b>'
        f'{(" · " + esc(app.get("error"))) if app.get("error") else ""}</p>'
        f'<form method="post" action="/devices/{esc(d.device_id)}/app" class="inline">'
        f'{csrf_field(csrf)}{buttons}</form>'
        f'{"" if d.connected else "<p class=hint>not connected: no remote control</p>"}'
        "</section>"
    )
    history = _table(
        ("time", "kind", "details"),
        (
            f"<tr><td>{when(e.time)}</td><td>{esc(e.kind)}</td>"
            f"<td>{esc(_data(e.data))}</td></tr>"
            for e in reversed(detail.history)
        ),
    )
    pushes = _table(
        ("push", "version", "mode", "state", "result", "updated"),
        (
            f"<tr><td>{esc(p.push_id)}</td><td>{esc(p.version)}</td><td>{esc(p.mode)}</td>"
            f"<td>{esc(p.state)}</td><td>{esc(p.result)}</td><td>{when(p.updated)}</td></tr>"
            for p in detail.deliveries
        ),
    )
    return (
        f'{flash(message)}<h1>Device <span id="device-id">{esc(d.device_id)}</span></h1>'
        f'<div class="grid"><section><h2>Facts</h2><dl>{dl}</dl></section>{control}</div>'
        f"<section><h2>Update history</h2>{history}</section>"
        f"<section><h2>Pushes</h2>{pushes}</section>"
    )


def device_logs(device_id: str, connected: bool) -> str:
    """The live log panel: outside ``main``, so refreshes keep its lines."""
    if not connected:
        return '<section class="logs"><h2>Logs</h2><p class="hint">not connected</p></section>'
    return (
        '<section class="logs"><h2>Logs</h2>'
        f'<pre id="log" data-src="/devices/{esc(device_id)}/logs"></pre></section>'
    )


def _data(data: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, "", [], {}))


def release_actions(r: ReleaseInfo, csrf: str, back: str = "") -> str:
    """The lifecycle buttons; one the lifecycle forbids is disabled, saying why."""
    out = []
    for status, label in RELEASE_ACTIONS:
        if status == r.status:
            continue
        allowed = (r.status, status) in LIFECYCLE
        reason = f"{r.status} -> {status} is not allowed"
        why = "" if allowed else f' disabled title="{esc(reason)}"'
        out.append(f'<button name="status" value="{status}"{why}>{label}</button>')
    return (
        f'<form method="post" action="/releases/status" class="inline">{csrf_field(csrf)}'
        f'<input type="hidden" name="app" value="{esc(r.app)}">'
        f'<input type="hidden" name="version" value="{esc(r.version)}">'
        f'<input type="hidden" name="back" value="{esc(back)}">{"".join(out)}</form>'
    )


def release(d: ReleaseDetail, csrf: str, message: str) -> str:
    r = d.info
    facts = [("status", r.status), ("sequence", r.sequence), ("created", when(r.created)),
             ("size", f"{r.size:,} bytes"), ("files", r.files), ("restart", r.restart),
             ("notes", r.notes or "-"), ("schema", r.schema_version)]
    dl = "".join(f'<dt>{esc(k)}</dt><dd data-fact="{esc(k)}">{esc(v)}</dd>' for k, v in facts)
    files = _table(("path", "size", "mode"), (
        f'<tr><td>{esc(p)}</td><td class="num">{n:,}</td><td>{mode:o}</td></tr>'
        for p, n, mode in d.files[:200]
    ))
    more = f"<p class=hint>and {len(d.files) - 200} more files</p>" if len(d.files) > 200 else ""
    signers = "".join(f"<li><code>{esc(k[:16])}</code></li>" for k in d.signers)
    history = _table(("time", "from", "to", "by"), (
        f"<tr><td>{when(t)}</td><td>{esc(old or '-')}</td><td>{esc(new)}</td>"
        f"<td>{esc(by)}</td></tr>"
        for old, new, t, by in reversed(d.history)
    ))
    back = f"/releases/{r.app}/{r.version}"
    return (
        f"{flash(message)}<h1>Release {esc(r.app)} {esc(r.version)}</h1>"
        f"{release_actions(r, csrf, back)}"
        f'<div class="grid"><section><h2>Facts</h2><dl>{dl}</dl></section>'
        f'<section><h2>Signed by (key ids)</h2><ul class="plain">{signers}</ul>'
        f"<h2>Lifecycle</h2>{history}</section></div>"
        f"<section><h2>Files</h2>{files}{more}</section>"
    )


def releases(rows: list[ReleaseInfo], app: str | None, next_cursor: str | None, csrf: str,
             message: str) -> str:
    def actions(r: ReleaseInfo) -> str:
        return release_actions(r, csrf)

    table = _table(
        ("app", "version", "seq", "status", "created", "size", "files", "notes", "actions"),
        (
            f'<tr data-release="{esc(r.app)} {esc(r.version)}"><td>{esc(r.app)}</td>'
            f'<td><a href="/releases/{esc(r.app)}/{esc(r.version)}">{esc(r.version)}</a></td>'
            f"<td>{r.sequence}</td>"
            f'<td class="status">{esc(r.status)}</td><td>{when(r.created)}</td>'
            f'<td class="num">{r.size:,}</td><td class="num">{r.files}</td>'
            f"<td>{esc(r.notes)}</td><td>{actions(r)}</td></tr>"
            for r in rows
        ),
    )
    form = (f'<form method="get" action="/releases" class="filters"><label>app <input name="app" '
            f'value="{esc(app or "")}"></label><button>Filter</button></form>')
    more = ""
    if next_cursor is not None:
        more = f'<p class="pager"><a href="{esc(url("/releases", app=app, after=next_cursor))}">' \
               "next page</a></p>"
    return (f"{flash(message)}<h1>Releases</h1>{form}{table}{more}"
            "<p class=hint>Lifecycle: draft → pre-released → approved; revoked from any "
            "state.</p>")


def deployments(rows: list[DeploymentInfo], csrf: str, message: str) -> str:
    table = _table(
        ("deployment", "release", "state", "phase", "progress", "created", "by"),
        (
            f'<tr><td><a href="/deployments/{esc(d.deployment_id)}">{esc(d.deployment_id)}</a>'
            f"</td><td>{esc(d.app)} {esc(d.version)}</td>"
            f'<td class="state-{esc(d.state)}">{esc(d.state)}</td>'
            f"<td>{d.phase + 1}/{len(d.phases)}</td><td>{deployment_progress(d)}</td>"
            f"<td>{when(d.created)}</td><td>{esc(d.operator)}</td></tr>"
            for d in rows
        ),
    )
    def field(name: str, label: str, extra: str = "") -> str:
        return f'<label>{label} <input name="{name}"{extra}></label>'

    form = (
        '<section><h2>New deployment</h2><form method="post" action="/deployments" '
        f'class="filters" id="deploy-form">{csrf_field(csrf)}'
        f'{field("app", "app", " required")}{field("version", "version", " required")}'
        f'{field("group", "group")}{field("devices", "devices (comma-separated)")}'
        '<label>all devices <input type="checkbox" name="all" value="1"></label>'
        f'{field("phases", "phases (e.g. 1,50%)")}'
        f'{field("max_concurrent", "max concurrent", " inputmode=numeric")}'
        f'{field("halt_after_failures", "halt after failures %", " inputmode=decimal")}'
        f'{field("min_executed", "halt only after N finished", " inputmode=numeric")}'
        '<label>on halt <select name="on_halt"><option value="pause">pause the release</option>'
        '<option value="revoke">revoke the release</option></select></label>'
        f'{field("device_timeout", "device timeout s", " inputmode=decimal")}'
        "<button>Create</button></form></section>"
    )
    return f"{flash(message)}<h1>Deployments</h1>{table}{form}"


def deployment(d: DeploymentInfo, csrf: str, message: str) -> str:
    buttons = []
    for action, allowed in (("pause", d.state == "running"),
                            ("resume", d.state in ("paused", "halted")),
                            ("abort", d.state in ACTIVE_DEPLOYMENTS)):
        why = "" if allowed else f' disabled title="not possible while {esc(d.state)}"'
        buttons.append(f'<button name="action" value="{action}"{why}>{action}</button>')
    # d.phases are cumulative: the rollout position each phase ends at (§7.7.1).
    phases = "".join(
        f"<li>phase {i + 1}: {n - (d.phases[i - 1] if i else 0)} device(s), {n} in all"
        f"{' ← current' if i == d.phase else ''}</li>"
        for i, n in enumerate(d.phases)
    )
    counts = "".join(
        f'<tr><td>{esc(s)}</td><td class="num" data-count="{esc(s)}">{n}</td>'
        f'<td><meter min="0" max="{max(d.targets, 1)}" value="{n}"></meter></td></tr>'
        for s, n in sorted(d.counts.items())
    )
    halted = (f'<p class="flash error" id="halt-reason">{esc(d.reason)}</p>'
              if d.reason else "")
    devices = _table(
        ("device", "phase", "state", "detail"),
        (
            f"<tr><td>{_device_link(x.device_id)}</td><td>{x.phase + 1}</td>"
            f"<td>{esc(x.state)}</td><td>{esc(x.reason)}</td></tr>"
            for x in d.devices
        ),
    )
    return (
        f'{flash(message)}<h1>Deployment {esc(d.deployment_id)}</h1>'
        f'<p>{esc(d.app)} {esc(d.version)} · state <b id="dep-state">{esc(d.state)}</b> · '
        f"{deployment_progress(d)} · by {esc(d.operator)}</p>{halted}"
        f'<form method="post" action="/deployments/{esc(d.deployment_id)}" class="inline">'
        f'{csrf_field(csrf)}{"".join(buttons)}</form>'
        f'<div class="grid"><section><h2>Phases</h2><ol class="plain">{phases}</ol></section>'
        f"<section><h2>Devices by state</h2>{_table(('state', 'devices', ''), [counts])}"
        f"</section></div><section><h2>Devices (first page)</h2>{devices}</section>"
    )
