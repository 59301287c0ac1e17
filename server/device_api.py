"""Device methods (specs/PROTOCOL.md §7): what a device asks and reports.

``check_update`` offers the newest release the device may install (§7.10) and
records what the device reported; ``get_manifest`` and ``get_chunks`` serve a
release the device may fetch: ``approved``, or ``pre-released`` to a beta
device or one that was pushed it (§7.7); any other is ``UNAVAILABLE``. A
release hashed with an algorithm the device did not announce in its hello
(only ``sha256`` needs no announcement) is ``UNAVAILABLE`` too, with a reason
naming it, for all three (§7.2); so is a release cut into content-defined
chunks for a device that did not announce "chunks-v" (§7.3.3). ``get_chunks`` streams its DATA
frames (§7.8) through ``send_chunks`` (chunks.py), reading ahead and
prefetching the next request's first chunk. ``update_progress`` and
``app_status`` are notifications: they are recorded and relayed to watchers.
``report_outcomes`` is the durable copy of a device's outcomes: answered only
once committed (§7.6.1).

Every handler takes ``(services, call, params)``; the session has already
checked that the caller is an accepted device.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
import trio
from fleetpush.protocol import Manifest
from fleetpush.protocol.errors import Forbidden, NotFound
from fleetpush.protocol.freshness import NONCE_SIZE
from fleetpush.protocol.handshake import ZSTD, can_fetch_chunks, can_verify
from fleetpush.protocol.messages import (
    AppStatus,
    CheckUpdate,
    CheckUpdateResult,
    GetChunks,
    GetChunksResult,
    GetFreshness,
    GetFreshnessResult,
    GetManifest,
    GetManifestResult,
    GetRoot,
    GetRootResult,
    ReportOutcomes,
    ReportOutcomesResult,
    UpdateProgress,
)

from . import quota
from .artifacts import Remote, pack_name, read_remote_frame
from .call import Call
from .chunk_io import ChunkSource
from .chunk_pack import PackIndex, load_index, pack_path, read_verified_frame
from .chunks import ChunkJob, send_chunks
from .errors import BadRequest, ChunkUnavailable, ObjectStoreError, Unavailable
from .releases import ReleaseRecord
from .services import Services

#: ``downloading`` progress is written to the history at most this often per device.
PROGRESS_PERSIST_INTERVAL: Final = 1.0

#: Progress states a device also sends as outcomes (client/reporting.py _EVENT_STATES).
OUTCOME_STATES: Final = ("staged", "trial", "committed", "rolled_back", "failed")

#: Outcome steps remembered per connection (a device sends its outcomes within seconds).
RELAYED_KEPT: Final = 16


async def check_update(services: Services, call: Call, p: CheckUpdate) -> CheckUpdateResult:
    """Record what the device runs; offer the newest release it may install (§7.10).

    Raises :class:`Forbidden` (another app than the hello's),
    :class:`Unavailable` (the offer uses a hash the device did not announce).
    """
    _device_app(call, p.app)
    now = time.time()
    services.devices.record_check(
        call.device_id, version=p.version, channel=p.channel, sequence=p.sequence, now=now
    )
    # Off the trio thread on PostgreSQL (db_calls.py): every device asks at
    # each connection and on its check interval.
    record = await services.calls.run(
        functools.partial(
            services.releases.offer,
            app=p.app,
            channel=p.channel,
            sequence=p.sequence,
            installed=p.version,
            now=now,
        )
    )
    if record is None:
        return CheckUpdateResult(available=False)
    _check_hash(services, call, record)
    return CheckUpdateResult(
        available=True,
        version=record.version,
        sequence=record.sequence,
        manifest=record.signed,
        status=record.status,
    )


async def get_manifest(services: Services, call: Call, p: GetManifest) -> GetManifestResult:
    """The signed manifest of a release the device may fetch.

    Its reads run off the trio thread on PostgreSQL (db_calls.py): every
    device fetches it once per update; the hash check (the manifest cache,
    trio thread only) after them. Raises NotFound, :class:`Forbidden`,
    :class:`Unavailable`.
    """
    _device_app(call, p.app)
    record = await services.calls.run(_fetchable, services, call.device_id, p.app, p.version)
    _check_hash(services, call, record)
    return GetManifestResult(manifest=record.signed, status=record.status)


def get_root(services: Services, call: Call, p: GetRoot) -> GetRootResult:
    """The published root ``version``, exactly as signed (§8.5). Raises NotFound."""
    envelope = services.roots.get(p.version)
    if envelope is None:
        raise NotFound(f"no root version {p.version} is published")
    return GetRootResult(root=envelope)


async def get_freshness(services: Services, call: Call, p: GetFreshness) -> GetFreshnessResult:
    """A freshness statement answering ``p.nonce`` (§8.6); the release
    sequences it names are read off the trio thread on PostgreSQL (db_calls.py).

    Raises :class:`Unavailable` (no timestamp key), :class:`BadRequest` (a nonce
    that is not 32 bytes).
    """
    signer = services.freshness
    if signer is None:
        raise Unavailable("this releaser has no timestamp key: it signs no freshness statements")
    if len(p.nonce) != NONCE_SIZE:
        raise BadRequest(f"get_freshness: nonce must be {NONCE_SIZE} bytes")
    app = call.caller.app
    seqs = await services.calls.run(signer.sequences, app) if app else None
    return GetFreshnessResult(
        freshness=signer.statement(p.nonce, app, now=time.time(), sequences=seqs)
    )


async def get_chunks(services: Services, call: Call, p: GetChunks) -> None:
    """Stream the chunks asked for, then answer with their count (§7.8).

    Raises ``RpcError(UNAVAILABLE)`` (shutting down), NotFound, Forbidden, Unavailable,
    :class:`BadRequest` (no such file or chunk), :class:`ChunkUnavailable`
    (the bytes on disk do not match the manifest).
    """
    with services.chunk_streams.serving():
        record = _visible(services, call, p.app, p.version)
        damage = services.scrub.damage_of(record.dir)
        if damage is not None:
            # Never serve bytes the scrub found changed on disk (scrub.py).
            raise Unavailable(
                f"release {p.app} {record.version} is damaged on the releaser "
                f"({damage.message()}); the operator must republish it"
            )
        manifest = services.manifests.get(str(record.dir), record.signed.signed)
        wanted: list[tuple[int, int]] = []
        for file_index, chunk_index in p.chunks:
            if not 0 <= file_index < len(manifest.files):
                raise BadRequest(f"no file {file_index} in {p.app} {p.version}")
            entry = manifest.files[file_index]
            if not 0 <= chunk_index < len(entry.chunks):
                raise BadRequest(f"no chunk {chunk_index} in {entry.path}")
            wanted.append((file_index, chunk_index))
        call.start_chunks(wanted)
        # §2.3.1: DATA_ZSTD for the chunks publishing packed, to a device announcing "zstd".
        remote = _remote(services, record)
        packed = await _pack_index(services, record) if ZSTD in call.caller.capabilities else {}
        jobs = [_job(record, manifest, f, c, packed, remote) for f, c in wanted]
        # What a sequential reader asks for next, as many chunks as this
        # request: warmed in one read while the answer goes out.
        follow: list[tuple[int, int]] = []
        after = _following_chunk(manifest, *wanted[-1]) if wanted else None
        while after is not None and len(follow) < len(wanted):
            follow.append(after)
            after = _following_chunk(manifest, *after)

        metrics = services.metrics

        async def send(job: ChunkJob, data: bytes | bytearray) -> None:
            compressed = (job.file, job.chunk) in packed
            await call.send_chunk(job.file, job.chunk, memoryview(data), compressed=compressed)
            metrics.chunks_served.inc()
            metrics.bytes_served.inc(len(data))

        async def send_run(run: Sequence[ChunkJob], data: list[bytes | bytearray]) -> None:
            frames = [
                (job.file, job.chunk, d, (job.file, job.chunk) in packed)
                for job, d in zip(run, data, strict=True)
            ]
            await call.send_chunk_run(frames)
            metrics.chunks_served.inc(len(run))
            metrics.bytes_served.inc(sum(len(d) for d in data))

        async def finish() -> None:
            await call.respond(GetChunksResult(sent=len(wanted)))

        try:
            await send_chunks(
                services.cache,
                jobs,
                send,
                finish,
                prefetch=[_job(record, manifest, *c, packed, remote) for c in follow],
                send_run=send_run,
            )
        except ChunkUnavailable as e:
            call.log.error("refusing to serve %s: %s", e, e.__cause__)
            raise


def update_progress(services: Services, call: Call, p: UpdateProgress) -> None:
    """Record a device's progress (§7.6) within its storage budget (quota.py).

    The device's row always takes the newest state (one row, overwritten; its
    error clipped). The history gets ``downloading`` at most 1/s and other
    states within the device's rate limit, and nothing in low-disk mode.
    """
    device_id = call.device_id
    now = time.time()
    if p.error is not None and len(p.error) > quota.TEXT_BYTES:
        p = attrs.evolve(p, error=quota.clip(p.error))
    services.devices.record_progress(device_id, p, now)
    if p.push_id:
        services.pushes.record_result(p.push_id, device_id, p.state, now)
    elif p.state == "committed" and p.version:
        # A trial's commit names no push: it finishes the pushes of that version (§7.4).
        services.pushes.record_committed(device_id, p.app, p.version, now)
    if p.state == "downloading":
        mono = trio.current_time()
        persist = mono - call.caller.progress_persisted >= PROGRESS_PERSIST_INTERVAL
        if persist:
            call.caller.progress_persisted = mono
    else:
        persist = services.rates.allow(device_id, "progress")
    persist = persist and not services.disk.low
    if p.state in ("committed", "rolled_back", "failed"):
        call.log.info(
            "update %s %s: %s%s", p.app, p.version, p.state, f" ({p.error})" if p.error else ""
        )
    if persist and p.state in OUTCOME_STATES:
        relayed = call.caller.relayed
        relayed.append((p.state, p.version))
        del relayed[:-RELAYED_KEPT]
    services.events.emit(
        "progress",
        device_id,
        {
            "state": p.state,
            "app": p.app,
            "version": p.version,
            "push_id": p.push_id,
            "bytes_done": p.bytes_done,
            "bytes_total": p.bytes_total,
            "error": p.error,
        },
        persist=persist,
    )


async def report_outcomes(
    services: Services, call: Call, p: ReportOutcomes
) -> ReportOutcomesResult:
    """Record a device's outcome history, committed before the answer (§7.6.1).

    The device deletes an entry only once its id is acknowledged, so a
    releaser killed at any point loses none (issue 10, item 11); re-sent
    entries are acknowledged again and ignored. Raises
    :class:`~.db.DatabaseError` (nothing acknowledged: the device sends them
    again later).

    The commit runs off the trio thread on PostgreSQL (db_calls.py); it is not
    abandoned if this call is cancelled, and the acknowledgement is sent only
    after it returned.
    """
    device_id = call.device_id
    fresh = await services.calls.run(
        services.devices.record_outcomes, device_id, p.reports, time.time()
    )
    for o in fresh:
        call.log.info(
            "reported %s %s %s%s", o.event, o.app, o.version, f" ({o.error})" if o.error else ""
        )
        data: dict[str, object] = {
            "event": o.event,
            "app": o.app,
            "version": o.version,
            "push_id": o.push_id,
            "error": o.error,
        }
        if o.state:
            data.update(state=o.state, bytes_done=0, bytes_total=0)
        if o.state and (o.state, o.version) in call.caller.relayed:
            # The live update_progress of this step is already in the event log:
            # the durable copy updates the device's row only, or every watcher
            # saw "staged", "trial", "rolled_back" twice (issue 11, item 6).
            call.caller.relayed.remove((o.state, o.version))
            continue
        services.events.emit("progress" if o.state else "report", device_id, data)
    # The events too, before the acknowledgement.
    await services.calls.run(services.devices.writer.flush)
    return ReportOutcomesResult(acknowledged=[o.report_id for o in p.reports])


def app_status(services: Services, call: Call, s: AppStatus) -> None:
    """Record the supervised app's state (§7.6) within the device's storage budget.

    The log tail is cut to its newest lines within ``quota.LOG_TAIL_BYTES``
    and stored once, in the device's row; the event (live and in the history)
    carries the rest. The row is the device's *current* status and is
    overwritten in place (its size is bounded, so it never grows the
    database): it is always updated, or ``devices`` would show a state the app
    left long ago. What the rate limit and low-disk mode hold back is the
    history: past the device's rate limit, or on a low disk, the event is not
    stored (watchers still get it) (issue 10, item 2).
    """
    data: dict[str, object] = {
        "state": s.state,
        "pid": s.pid,
        # Milliseconds are enough, and events stay readable (issue 11, item 6).
        "uptime": round(s.uptime, 3),
        "exit_code": s.exit_code,
        "error": quota.clip(s.error),
    }
    low_disk = services.disk.low
    if not low_disk:
        row = {**data, "log_tail": quota.trim_log_tail(s.log_tail)}
        services.devices.record_app_status(call.device_id, row, time.time())
    keep = not low_disk and services.rates.allow(call.device_id, "app_status")
    services.events.emit("app_status", call.device_id, data, persist=keep)


# --- helpers ---------------------------------------------------------------------------


def _device_app(call: Call, app: str) -> None:
    """Raises :class:`Forbidden` if the device's hello named another app, or none.

    A hello with ``app = nil`` used to mean "any app": under auto-enrolment any
    stranger could fetch every approved release of every app (issue 10, item 9).
    A device now reads only its own app's releases (specs/THREATS.md).
    """
    if call.caller.app is None:
        raise Forbidden("this device named no app in its hello: it may fetch no release")
    if app != call.caller.app:
        raise Forbidden(f"this device runs {call.caller.app!r}, not {app!r}")


def _visible(services: Services, call: Call, app: str, version: str) -> ReleaseRecord:
    """The release if this device may fetch it (§7.10).

    Raises NotFound, :class:`Forbidden` (another app than the hello's),
    :class:`Unavailable` (its status or channel, or its hash, §7.2).
    """
    _device_app(call, app)
    record = _fetchable(services, call.device_id, app, version)
    _check_hash(services, call, record)
    return record


def _fetchable(services: Services, device_id: str, app: str, version: str) -> ReleaseRecord:
    """The database part of :func:`_visible`: statements only, safe in a
    worker thread (db_calls.py). Raises NotFound, :class:`Unavailable`.
    """
    record = services.releases.get(app, version)
    if record.status == "approved":
        return record
    if record.status == "paused" and services.pushes.targets_of(device_id, app, record.version):
        # A halted deployment paused it (§7.7.1): updates under way finish.
        return record
    if record.status == "pre-released":
        row = services.devices.get(device_id)
        channel = row["channel"] if row is not None else None
        if channel == "beta" or services.pushes.targets_of(device_id, app, record.version):
            return record
    # §9.1: UNAVAILABLE, "not available to this device (status, channel)";
    # FORBIDDEN is for what the caller's role may not do (issue 9, item 2).
    raise Unavailable(
        f"release {app} {record.version} is {record.status}: not available to this device"
    )


def _check_hash(services: Services, call: Call, record: ReleaseRecord) -> None:
    """Raises :class:`Unavailable` if the device cannot verify the release's hash (§7.2)
    or fetch its content-defined chunks (§7.3.3: a 1.0 device would cut them wrong).
    """
    manifest = services.manifests.get(str(record.dir), record.signed.signed)
    if not can_verify(call.caller.capabilities, manifest.hash):
        raise Unavailable(
            f"release {record.app} {record.version} uses {manifest.hash}, "
            "which this device did not announce in its hello capabilities"
        )
    if not can_fetch_chunks(call.caller.capabilities, manifest.variable_chunks):
        raise Unavailable(
            f"release {record.app} {record.version} uses content-defined chunks, "
            "which this device did not announce in its hello capabilities; "
            "upgrade fleetpush on the device"
        )


def _remote(services: Services, record: ReleaseRecord) -> Remote | None:
    """The object store and name of a release stored there (artifacts.py), else None.

    Raises :class:`ChunkUnavailable` if its location cannot be used.
    """
    if not record.remote:
        return None
    try:
        return services.artifacts.resolve(record.location)
    except ObjectStoreError as e:
        raise ChunkUnavailable(
            f"release {record.app} {record.version} could not be read from the object store: {e}"
        ) from e


async def _pack_index(services: Services, record: ReleaseRecord) -> PackIndex:
    if not record.remote:
        return load_index(pack_path(record.dir))
    # A network read the first time (then cached): in a worker thread.
    return await trio.to_thread.run_sync(services.artifacts.pack_index, record.location)


def _chunk_job(
    record: ReleaseRecord, manifest: Manifest, file: int, chunk: int, remote: Remote | None = None
) -> ChunkJob:
    entry = manifest.files[file]
    # Fixed or content-defined chunks alike (§7.3.3): the manifest says where.
    offset, length = entry.chunk_span(manifest.chunk_size, chunk)
    # Read, not re-hashed: the store's digests were verified at publish (§7.4);
    # the device verifies each chunk, and scrub.py checks the store at rest.
    return ChunkJob(
        file=file,
        chunk=chunk,
        key=(str(record.dir), file, chunk),
        size=length,
        source=ChunkSource(record.dir / entry.path, offset)
        if remote is None
        else ChunkSource(Path(f"{remote[1]}/{entry.path}"), offset, store=remote[0]),
        what=f"{entry.path} chunk {chunk} of {manifest.app} {manifest.version}",
    )


def _job(  # noqa: PLR0917 - private
    record: ReleaseRecord,
    manifest: Manifest,
    file: int,
    chunk: int,
    packed: PackIndex,
    remote: Remote | None = None,
) -> ChunkJob:
    """The job sending (file, chunk): its zstd frame if it has one in ``packed``, else as is."""
    return _zstd_job(record, manifest, file, chunk, packed, remote) or _chunk_job(
        record, manifest, file, chunk, remote
    )


def _zstd_job(  # noqa: PLR0917 - private
    record: ReleaseRecord,
    manifest: Manifest,
    file: int,
    chunk: int,
    packed: PackIndex,
    remote: Remote | None = None,
) -> ChunkJob | None:
    """The job sending chunk (file, chunk) as its packed zstd frame, if it has one."""
    where = packed.get((file, chunk))
    if where is None:
        return None
    entry = manifest.files[file]
    check = (entry.chunk_span(manifest.chunk_size, chunk)[1], manifest.hash, entry.chunks[chunk])
    if remote is None:
        load = functools.partial(read_verified_frame, pack_path(record.dir), where, *check)
    else:
        load = functools.partial(read_remote_frame, remote[0], pack_name(remote[1]), where, *check)
    return ChunkJob(
        file=file,
        chunk=chunk,
        key=("zstd", str(record.dir), file, chunk),
        size=where[1],
        load=load,
        remote=remote is not None,
        what=f"{entry.path} chunk {chunk} (zstd) of {manifest.app} {manifest.version}",
    )


def _following_chunk(manifest: Manifest, file: int, chunk: int) -> tuple[int, int] | None:
    """The chunk a sequential download asks for after (file, chunk), if any."""
    if chunk + 1 < len(manifest.files[file].chunks):
        return file, chunk + 1
    for f in range(file + 1, len(manifest.files)):
        if manifest.files[f].chunks:
            return f, 0
    return None
