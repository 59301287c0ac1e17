"""The releaser's schema: one SQLite text and one migration list for both backends.

server/db.py runs them on SQLite as they are, and on PostgreSQL through
pg.pg_schema (types, identity columns, expression indexes: issue 15).
"""

from __future__ import annotations

from typing import Final

SCHEMA_VERSION: Final = 2

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Which schema versions were applied when (issue 15). meta 'schema' stays the
-- number every releaser checks, so older releasers still refuse a newer one.
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    app TEXT NOT NULL,
    version TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    notes TEXT NOT NULL,
    size INTEGER NOT NULL,
    files INTEGER NOT NULL,
    restart INTEGER NOT NULL,
    min_version TEXT,
    expires INTEGER,
    manifest BLOB NOT NULL,      -- the exact signed bytes
    signatures BLOB NOT NULL,    -- msgpack list of {keyid, sig}
    dir TEXT NOT NULL,           -- relative to the data dir
    PRIMARY KEY (app, version),
    UNIQUE (app, sequence)
);
CREATE TABLE IF NOT EXISTS release_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    version TEXT NOT NULL,
    old_status TEXT,
    new_status TEXT NOT NULL,
    time REAL NOT NULL,
    operator TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    enrollment TEXT NOT NULL,
    app TEXT,
    version TEXT,
    channel TEXT,
    grp TEXT,
    sequence INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'idle',
    staged_version TEXT,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    last_result TEXT,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    app_status TEXT,
    state_error TEXT             -- the error of the last update_progress (why deferred)
);
CREATE INDEX IF NOT EXISTS devices_app ON devices (app, grp);
CREATE TABLE IF NOT EXISTS pushes (
    push_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    operator TEXT NOT NULL,
    app TEXT NOT NULL,
    version TEXT NOT NULL,
    mode TEXT NOT NULL,
    restart INTEGER NOT NULL,
    selector TEXT NOT NULL       -- JSON: how the targets were named
);
CREATE TABLE IF NOT EXISTS push_targets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    push_id TEXT NOT NULL REFERENCES pushes (push_id),
    device_id TEXT NOT NULL,
    state TEXT NOT NULL,         -- queued, sent, accepted, refused, error, timeout, superseded
    detail TEXT NOT NULL DEFAULT '',
    result TEXT,                 -- last update_progress state reported for this push
    updated REAL NOT NULL,
    UNIQUE (push_id, device_id)
);
CREATE INDEX IF NOT EXISTS push_targets_device ON push_targets (device_id, state);
CREATE TABLE IF NOT EXISTS reports (   -- outcome report ids already recorded (§7.6.1)
    device_id TEXT NOT NULL,
    report_id TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (device_id, report_id)
);
-- Deployments (§7.7.1, server/deployments.py). New tables only, created here by
-- CREATE IF NOT EXISTS in any older database: no migration step and no schema
-- bump (an older releaser opening the file ignores them, and offers or pushes
-- no release in the status paused that a halt sets, as it knows no such status).
CREATE TABLE IF NOT EXISTS deployments (
    deployment_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    operator TEXT NOT NULL,
    app TEXT NOT NULL,
    version TEXT NOT NULL,
    selector TEXT NOT NULL,      -- JSON: how the targets were named
    phases TEXT NOT NULL,        -- JSON: cumulative device counts of each phase
    phase INTEGER NOT NULL,      -- index of the current phase
    phase_started REAL NOT NULL,
    max_concurrent INTEGER NOT NULL,
    failure_percent REAL,        -- the halt rule, NULL: none
    min_executed INTEGER NOT NULL,
    on_halt TEXT NOT NULL,
    phase_wait REAL,
    device_timeout REAL NOT NULL,
    restart INTEGER,
    state TEXT NOT NULL,         -- running, paused, halted, aborted, completed
    reason TEXT NOT NULL DEFAULT '',
    paused_from TEXT,            -- the release status a halt paused
    base_succeeded INTEGER NOT NULL DEFAULT 0,  -- counts at the last resume:
    base_failed INTEGER NOT NULL DEFAULT 0,     -- the rule looks at what came after
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deployments_app ON deployments (app, state);
CREATE TABLE IF NOT EXISTS deployment_devices (
    deployment_id TEXT NOT NULL REFERENCES deployments (deployment_id),
    device_id TEXT NOT NULL,
    ord INTEGER NOT NULL,        -- rollout order
    phase INTEGER NOT NULL,
    state TEXT NOT NULL,         -- pending, started, deferred, succeeded, failed, skipped
    reason TEXT NOT NULL DEFAULT '',
    push_id TEXT,
    started REAL,
    finished REAL,
    PRIMARY KEY (deployment_id, device_id)
);
CREATE INDEX IF NOT EXISTS deployment_devices_order ON deployment_devices (deployment_id, ord);
CREATE INDEX IF NOT EXISTS deployment_devices_device ON deployment_devices (device_id, state);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    device_id TEXT,
    data TEXT NOT NULL
);
-- The audit history's queries (list_events, get_device) by device, by kind,
-- by push and by age, each walking its index newest first (issue 13, part 2).
CREATE INDEX IF NOT EXISTS events_device ON events (device_id, seq);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, seq);
CREATE INDEX IF NOT EXISTS events_push ON events (json_extract(data, '$.push_id'), seq);
CREATE INDEX IF NOT EXISTS events_deployment
    ON events (json_extract(data, '$.deployment_id'), seq);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
-- Peer delivery (§7.11, server/p2p_tracker.py). New tables only, created by
-- CREATE IF NOT EXISTS in any older database, like the deployments tables:
-- who serves peers from where, and who was reported for a lie.
CREATE TABLE IF NOT EXISTS p2p_peers (
    device_id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    public_addr TEXT NOT NULL,
    subnet TEXT,
    site TEXT,
    host TEXT,
    port INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS p2p_bad (
    device_id TEXT NOT NULL,
    app TEXT NOT NULL,
    version TEXT NOT NULL,
    reporter TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (device_id, app, version, reporter)
);
-- How each device's download of a release arrived (its p2p_bytes report):
-- deploy show and the fleet view sum these (p2p_view, §7.11 "Operator view").
CREATE TABLE IF NOT EXISTS p2p_delivered (
    device_id TEXT NOT NULL,
    app TEXT NOT NULL,
    version TEXT NOT NULL,
    from_peers INTEGER NOT NULL,
    from_releaser INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (device_id, app, version)
);
-- Which releaser each device is live on (issue 15 §2, server/leases.py). New
-- tables only, created by CREATE IF NOT EXISTS in any older database, like
-- the deployments tables: releasers renew their own row every few seconds,
-- and a device's lease names the releaser its newest connection reached.
CREATE TABLE IF NOT EXISTS releasers (
    releaser_id TEXT PRIMARY KEY,  -- fresh for each releaser process
    address TEXT NOT NULL,         -- host:port, for the views
    started REAL NOT NULL,
    alive_until REAL NOT NULL      -- past this, its leases are free
);
CREATE TABLE IF NOT EXISTS device_leases (
    device_id TEXT PRIMARY KEY,
    releaser_id TEXT NOT NULL,
    since REAL NOT NULL            -- the taker's clock (leases.CLOCK_SLACK)
);
CREATE INDEX IF NOT EXISTS device_leases_since ON device_leases (since);
-- Operator calls forwarded to the releaser holding a device's live link
-- (server/cluster_calls.py, issue 15): the request, then its answer.
CREATE TABLE IF NOT EXISTS forwarded_calls (
    call_id TEXT PRIMARY KEY,      -- a random token: unique across releasers
    origin TEXT NOT NULL,          -- the releaser id that asks
    target TEXT NOT NULL,          -- the releaser id holding the device
    method TEXT NOT NULL,
    params TEXT NOT NULL,          -- JSON
    operator TEXT NOT NULL,        -- audited under this name on the target
    created REAL NOT NULL,
    deadline REAL NOT NULL,        -- the target skips it past this
    state TEXT NOT NULL,           -- pending, running, done, failed, expired
    answer TEXT                    -- JSON, once done or failed
);
CREATE INDEX IF NOT EXISTS forwarded_calls_target ON forwarded_calls (target, state);
"""


#: What turns a database of schema N-1 into schema N (SCHEMA above is already
#: the newest: a new database is created at SCHEMA_VERSION and skips these).
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    2: ("ALTER TABLE devices ADD COLUMN state_error TEXT",),  # issue 12: why deferred
}
