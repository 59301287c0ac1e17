"""Human output of the console: tables and one-line descriptions.

Tables are drawn with rich; when stdout is not a terminal rich drops colour
and styling, so the text stays greppable.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fleetpush.protocol.messages import DeviceDetail, DeviceInfo, Event, ReleaseInfo

#: Columns of a table written to a pipe or file: rich's default of 80 cut the
#: REASON and APP STATUS columns to "…", which a script cannot grep.
PIPE_WIDTH = 250


def console() -> Console:
    width = None
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        width = PIPE_WIDTH
    return Console(highlight=False, soft_wrap=False, width=width)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def ago(ts: float, now: float | None = None) -> str:
    if not ts:
        return "never"
    delta = (time.time() if now is None else now) - ts
    delta = max(delta, 0)
    if delta < 60:
        return f"{delta:.0f}s ago"
    if delta < 3600:
        return f"{delta / 60:.0f}m ago"
    if delta < 86400:
        return f"{delta / 3600:.1f}h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def device_state(d: DeviceInfo, *, reason: bool = True) -> str:
    """The state column; ``reason``: with why it is deferred (where no REASON column is)."""
    if d.enrollment != "accepted":
        return d.enrollment
    if d.duplicate:
        return f"{d.state} (DUPLICATE ID: {d.duplicate})"
    if d.state == "downloading" and d.bytes_total:
        return f"downloading {100 * d.bytes_done // d.bytes_total}%"
    if reason and d.state == "deferred" and d.state_error:
        # Why it is not updating now, as the device said it (§7.6; issue 12).
        return f"deferred: {d.state_error}"
    return d.state


def version_text(d: DeviceInfo) -> str:
    """The version a device runs, marked while it is on trial (issue 11, item 6)."""
    text = d.version or "-"
    if d.trial_version:
        text += " (on trial)" if d.trial_version == d.version else f" (trial {d.trial_version})"
    return text


def app_status_text(status: dict[str, Any] | None) -> str:
    if not status:
        return "-"
    text = str(status.get("state", "?"))
    if status.get("pid"):
        text += f" pid {status['pid']}"
    if status.get("exit_code") is not None:
        text += f" exit {status['exit_code']}"
    if status.get("error"):
        text += f" ({status['error']})"
    return text


def reason_text(d: DeviceInfo) -> str:
    """Why the device is where it is: why it is deferred, as it said it (§7.6; issue
    12), else its last failure or rollback (issue 13, part 2)."""
    if d.state == "deferred" and d.state_error:
        return d.state_error
    last = d.last_result or {}
    if last.get("state") in ("failed", "rolled_back") and last.get("error"):
        return f"{last['state']} {last.get('version') or ''}: {last['error']}".replace(" :", ":")
    return "-"


def print_devices(devices: list[DeviceInfo], *, bad: dict[str, int] | None = None) -> None:
    """The device table; ``bad`` (device id -> bad-peer reports) adds a BAD PEER
    column when any listed device was reported (§7.11), else the table is as before."""
    table = Table(box=None, pad_edge=False)
    # Which releaser each is on, only when they are on more than one (issue 15):
    # one releaser's table keeps its width (device ids are never cut).
    several = len({d.releaser for d in devices if d.releaser}) > 1
    columns = ["DEVICE", "APP", "VERSION", "CHANNEL", "GROUP", "STATE", "CONNECTED"]
    for col in [*columns, *(["RELEASER"] if several else []), "LAST SEEN"]:
        table.add_column(col, no_wrap=True)
    reported = bad is not None and any(bad.get(d.device_id) for d in devices)
    if reported:
        table.add_column("BAD PEER", no_wrap=True)
    table.add_column("APP STATUS")
    table.add_column("REASON")
    now = time.time()
    for d in devices:
        marker = []
        if reported and bad is not None:
            n = bad.get(d.device_id, 0)
            marker = [f"{n} report{'s' if n != 1 else ''}" if n else "-"]
        cells = [
            d.device_id,
            d.app or "-",
            version_text(d),
            d.channel or "-",
            d.group or "-",
            device_state(d, reason=False),
            "yes" if d.connected else "no",
            *([d.releaser or "-"] if several else []),
            ago(d.last_seen, now),
            *marker,
            app_status_text(d.app_status),
            reason_text(d),
        ]
        table.add_row(*cells)
    out = console()
    if devices:
        out.print(table)
    else:
        out.print("no devices")


def _schema_text(schema_version: int | None, min_schema: int | None) -> str:
    """``2`` (the data schema the release writes), ``2 (from 1)``, or ``-`` (no claim)."""
    if schema_version is None:
        return "-"
    return str(schema_version) if min_schema is None else f"{schema_version} (from {min_schema})"


def print_releases(releases: list[ReleaseInfo]) -> None:
    table = Table(box=None, pad_edge=False)
    # SCHEMA only when some release makes a data schema claim: the table stays
    # as narrow as before for apps that do not use one.
    schema = any(r.schema_version is not None for r in releases)
    cols = ("APP", "VERSION", "SEQ", "STATUS", "SIZE", "FILES", "RESTART")
    for col in (*cols, *(["SCHEMA"] if schema else []), "CREATED"):
        table.add_column(col, no_wrap=True)
    table.add_column("NOTES")
    for r in releases:
        row = [
            r.app,
            r.version,
            str(r.sequence),
            r.status,
            human_size(r.size),
            str(r.files),
            "yes" if r.restart else "no",
        ]
        if schema:
            row.append(_schema_text(r.schema_version, r.min_schema))
        table.add_row(*row, time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)), r.notes)
    out = console()
    if releases:
        out.print(table)
    else:
        out.print("no releases")


def describe_release(info: Any) -> str:
    """One line for whatever ``publish_release`` returned (a ReleaseInfo or alike)."""
    app = getattr(info, "app", "?")
    version = getattr(info, "version", "?")
    parts = [f"published {app} {version}"]
    if getattr(info, "sequence", None) is not None:
        parts.append(f"sequence {info.sequence}")
    if getattr(info, "status", None):
        parts.append(f"status {info.status}")
    if getattr(info, "size", None) is not None:
        parts.append(human_size(info.size))
    return ", ".join(parts)


def _value_text(value: Any) -> str:
    """An event value as text: JSON for lists and maps, floats to the millisecond.

    ``str()`` printed Python reprs (``['a', 'b']``, ``0.008185524000055011``)
    into the event log (issue 11, item 6).
    """
    if isinstance(value, str):
        return value
    return json.dumps(_rounded(value), ensure_ascii=False, separators=(",", ":"))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def json_line(value: Any) -> str:
    """``value`` (already JSON-able) as one line of JSON, floats to the millisecond."""
    return json.dumps(_rounded(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def print_device_detail(detail: DeviceDetail) -> None:
    """`fleetpush devices show ID`: every field, the app's status and log tail, pushes, history."""
    d = detail.device
    out = console()  # soft_wrap below: a long line (a log line, an error) stays one line
    now = time.time()
    fields: list[tuple[str, str]] = [
        ("device", d.device_id),
        ("public key", d.public_key.hex()),
        ("enrollment", d.enrollment),
        ("app", d.app or "-"),
        ("version", version_text(d)),
        ("channel", d.channel or "-"),
        ("group", d.group or "-"),
        ("state", device_state(d, reason=False)),
        ("connected", "yes" if d.connected else "no"),
        ("releaser", d.releaser or "-"),
        ("first seen", ago(d.first_seen, now)),
        ("last seen", ago(d.last_seen, now)),
        ("last result", _value_text(d.last_result) if d.last_result else "-"),
        ("reason", reason_text(d)),
        ("app status", app_status_text(d.app_status)),
    ]
    if d.state == "downloading" and d.bytes_total:
        fields.append(("download", f"{human_size(d.bytes_done)}/{human_size(d.bytes_total)}"))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        out.print(f"{key:<{width}}  {escape(value)}", highlight=False, soft_wrap=True)
    tail = (d.app_status or {}).get("log_tail") or []
    out.print(
        f"\napp log (last {len(tail)} lines):" if tail else "\napp log: -",
        highlight=False,
        soft_wrap=True,
    )
    for line in tail:
        out.print(f"  {escape(str(line))}", highlight=False, soft_wrap=True)
    out.print("\npushes:" if detail.deliveries else "\npushes: -", highlight=False, soft_wrap=True)
    for p in detail.deliveries:
        result = f" -> {p.result}" if p.result else ""
        extra = f" ({p.detail})" if p.detail else ""
        line = f"  {ago(p.updated, now):<16} {p.push_id}  {p.mode} {p.version}  {p.state}"
        out.print(escape(line + result + extra), highlight=False, soft_wrap=True)
    out.print("\nhistory:" if detail.history else "\nhistory: -", highlight=False, soft_wrap=True)
    for e in detail.history:
        out.print(f"  {escape(describe_event(e, dated=True))}", highlight=False, soft_wrap=True)


def describe_event(e: Event, *, dated: bool = False) -> str:
    """One plain line for an event, as `fleetpush watch` prints it without a terminal.

    ``dated``: the day too (``events`` and ``devices show`` span days; ``watch`` is live).
    """
    stamp = time.strftime("%Y-%m-%d %H:%M:%S" if dated else "%H:%M:%S", time.localtime(e.time))
    who = e.device_id or "-"
    data = dict(e.data)
    state = data.pop("state", None)
    parts = [stamp, f"{e.kind:<12}", who]
    if state:
        parts.append(str(state))
    version = data.pop("version", None)
    if version:
        parts.append(f"v{version}")
    if e.kind == "p2p_delivery":  # how a download arrived (§7.11)
        peers, releaser = data.pop("from_peers", 0), data.pop("from_releaser", 0)
        parts.append(f"{human_size(peers)} from peers, {human_size(releaser)} from the releaser")
    done, total = data.pop("bytes_done", None), data.pop("bytes_total", None)
    if total:
        parts.append(f"{human_size(done or 0)}/{human_size(total)}")
    error = data.pop("error", None)
    rest = " ".join(
        f"{k}={_value_text(v)}" for k, v in sorted(data.items()) if v not in (None, "", [], {})
    )
    if rest:
        parts.append(rest)
    if error:
        # A deferred update's error is its reason, not a failure (§7.6).
        parts.append(f"{'why' if state == 'deferred' else 'error'}: {error}")
    return "  ".join(parts)
