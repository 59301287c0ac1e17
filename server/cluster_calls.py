"""Operator calls forwarded to the releaser holding a device's live link (issue 15, part 2).

Several releasers share one fleet (specs/SCALE.md §5), but a device's
connection lives on one of them (leases.py). An operator's ``app_control`` or
``app_logs`` on releaser A for a device live on B goes through the database:

1. A writes a ``forwarded_calls`` row (target B, method, params as JSON,
   the operator's name, a deadline) and announces its id on the bus
   (cluster_batch.py: ids only);
2. B reads the row, claims it (``pending`` -> ``running``, one UPDATE, so a
   late notification and a catch-up never run it twice), runs it through
   the same handler path as a local call (app_remote.py: audited under the
   original operator), writes the answer and announces the id back;
3. A wakes its waiting operator. If no answer came by the deadline, or B's
   ``releasers`` row expired meanwhile (B killed: leases.ALIVE_FOR), A answers
   a one-line timeout error; B skips a request past its deadline.

The rows are the truth: B reads its pending requests on every catch-up
(a missed notification costs latency, not the call), A re-reads its row every
:data:`RECHECK` seconds while it waits, and the leader deletes rows
:data:`KEEP_FOR` seconds past their deadline. PostgreSQL mode only.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final

import attrs
import trio
from fleetpush.protocol import ErrorCode, FleetpushError

from . import db
from .errors import ServerError

log = logging.getLogger("fleetpush.server.cluster")

#: Requests queued on the target releaser at once; past that they stay
#: ``pending`` in the rows and the next catch-up offers them again.
QUEUE: Final = 64
#: Seconds between two looks at the row by a waiting origin (a lost
#: notification of the answer costs at most this).
RECHECK: Final = 1.0
#: Rows are deleted by the leader this long after their deadline.
KEEP_FOR: Final = 600.0

#: A runner: (method, operator, params, deadline) -> the answer as plain JSON.
Runner = Callable[[str, str, dict[str, Any], float], Awaitable[dict[str, Any]]]


class ForwardTimeout(ServerError):
    """The releaser holding the device did not answer by the deadline."""

    code = ErrorCode.UNAVAILABLE


class ForwardFailed(ServerError):
    """The forwarded call failed on the releaser holding the device (its message)."""

    code = ErrorCode.UNAVAILABLE


@attrs.frozen(kw_only=True)
class Request:
    """One ``forwarded_calls`` row."""

    call_id: str
    origin: str
    target: str
    method: str
    params: dict[str, Any]
    operator: str
    created: float
    deadline: float
    state: str = "pending"
    answer: dict[str, Any] | None = None


#: What a releaser does with a row it was told of (see :func:`decide`).
RUN, EXPIRE, ANSWERED, IGNORE = "run", "expire", "answered", "ignore"


def decide(req: Request, me: str, now: float, running: Collection[str]) -> str:
    """What releaser ``me`` does with ``req`` at ``now``: a pure decision.

    - ``run``: a pending request for me, in time, not already running here;
    - ``expire``: a pending request for me past its deadline (its origin
      answered its operator already: running it now would act unasked);
    - ``answered``: my own request, finished: wake the operator waiting;
    - ``ignore``: anything else (another pair's row, one still running).
    """
    if req.target == me and req.state == "pending":
        if now >= req.deadline:
            return EXPIRE
        return IGNORE if req.call_id in running else RUN
    if req.origin == me and req.state in ("done", "failed", "expired"):
        return ANSWERED
    return IGNORE


# --- the SQL (each one statement, so it can move to a worker thread) -------------------


def insert(conn: db.Connection, req: Request) -> None:
    conn.execute(
        "INSERT INTO forwarded_calls (call_id, origin, target, method, params, operator,"
        " created, deadline, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
        (
            req.call_id,
            req.origin,
            req.target,
            req.method,
            json.dumps(req.params),
            req.operator,
            req.created,
            req.deadline,
        ),
    )


def load(conn: db.Connection, call_ids: list[str]) -> list[Request]:
    if not call_ids:
        return []
    rows = conn.execute(
        "SELECT call_id, origin, target, method, params, operator, created, deadline, state,"
        " answer FROM forwarded_calls WHERE call_id IN (SELECT value FROM json_each(?))",
        (json.dumps(call_ids),),
    ).fetchall()
    return [
        Request(
            call_id=str(r[0]),
            origin=str(r[1]),
            target=str(r[2]),
            method=str(r[3]),
            params=json.loads(r[4]),
            operator=str(r[5]),
            created=float(r[6]),
            deadline=float(r[7]),
            state=str(r[8]),
            answer=None if r[9] is None else json.loads(r[9]),
        )
        for r in rows
    ]


def claim(conn: db.Connection, call_id: str) -> bool:
    """Take a pending request to run it; False if someone (a duplicate note) already did."""
    cur = conn.execute(
        "UPDATE forwarded_calls SET state = 'running' WHERE call_id = ? AND state = 'pending'",
        (call_id,),
    )
    return cur.rowcount == 1


def finish(conn: db.Connection, call_id: str, state: str, answer: dict[str, Any] | None) -> None:
    conn.execute(
        "UPDATE forwarded_calls SET state = ?, answer = ? WHERE call_id = ?",
        (state, None if answer is None else json.dumps(answer), call_id),
    )


def pending_for(conn: db.Connection, target: str, now: float) -> list[str]:
    """Ids of the requests for ``target`` not yet run and still in time (the catch-up)."""
    rows = conn.execute(
        "SELECT call_id FROM forwarded_calls WHERE target = ? AND state = 'pending'"
        " AND deadline > ? LIMIT ?",
        (target, now, QUEUE),
    ).fetchall()
    return [str(r[0]) for r in rows]


def alive(conn: db.Connection, releaser_id: str, now: float) -> bool:
    """False once ``releaser_id`` stopped renewing its ``releasers`` row (leases.py)."""
    row = conn.execute(
        "SELECT alive_until FROM releasers WHERE releaser_id = ?", (releaser_id,)
    ).fetchone()
    return row is not None and float(row[0]) > now


def trim(conn: db.Connection, before: float) -> int:
    """Delete rows whose deadline passed before ``before``; rows deleted."""
    return max(
        conn.execute("DELETE FROM forwarded_calls WHERE deadline < ?", (before,)).rowcount, 0
    )


def holders(
    conn: db.Connection, device_ids: Collection[str], now: float
) -> dict[str, tuple[str, str]]:
    """(releaser id, address) of the live releaser holding each device, if any."""
    if not device_ids:
        return {}
    rows = conn.execute(
        "SELECT l.device_id, r.releaser_id, r.address FROM device_leases l"
        " JOIN releasers r ON r.releaser_id = l.releaser_id"
        " WHERE l.device_id IN (SELECT value FROM json_each(?)) AND r.alive_until > ?",
        (json.dumps(sorted(device_ids)), now),
    ).fetchall()
    return {str(r[0]): (str(r[1]), str(r[2])) for r in rows}


# --- both ends ----------------------------------------------------------------------------


@attrs.define
class CallFigures:
    forwarded: int = 0
    answered: int = 0
    timed_out: int = 0
    served: int = 0
    expired: int = 0


class ForwardedCalls:
    """This releaser's forwarded calls: those it waits for and those it serves (trio thread).

    ``announce(call_id)`` tells the others of a written row (ClusterNode);
    ``runner`` runs a request here (app_remote.forwarded_runner, set at start).
    """

    def __init__(
        self,
        conn: db.Connection,
        releaser_id: str,
        announce: Callable[[str], None],
        clock: Callable[[], float] = time.time,
        run_db: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        self.conn = conn
        #: the runner of the stores' calls (db_calls.DbCalls.run): a worker
        #: thread on a pool connection; the state below stays on the trio thread
        self.run_db: Callable[..., Awaitable[Any]] = run_db or _inline
        self.releaser_id = releaser_id
        self.announce = announce
        self.clock = clock
        self.runner: Runner | None = None
        self.figures = CallFigures()
        self._waiting: dict[str, trio.Event] = {}
        self._answers: dict[str, Request] = {}
        self._running: set[str] = set()
        self._send, self._receive = trio.open_memory_channel[Request](QUEUE)

    async def forward(
        self, target: str, method: str, params: dict[str, Any], operator: str, timeout: float
    ) -> dict[str, Any]:
        """Run ``method`` on releaser ``target``; its answer.

        Raises :class:`ForwardTimeout` (no answer within ``timeout`` s),
        :class:`ForwardFailed` (the call failed there, or the row could not
        be written).
        """
        now = self.clock()
        req = Request(
            call_id=secrets.token_hex(8),
            origin=self.releaser_id,
            target=target,
            method=method,
            params=params,
            operator=operator,
            created=now,
            deadline=now + timeout,
        )
        self._waiting[req.call_id] = trio.Event()
        try:
            try:
                insert(self.conn, req)
            except db.ERRORS as e:
                raise ForwardFailed(f"cannot write the forwarded call: {e}") from e
            self.announce(req.call_id)
            self.figures.forwarded += 1
            with trio.move_on_after(timeout):
                while True:
                    with trio.move_on_after(RECHECK):
                        await self._waiting[req.call_id].wait()
                    done = self._answers.pop(req.call_id, None) or self._reread(req.call_id)
                    if done is not None:
                        self.figures.answered += 1
                        return _answer_of(done)
                    if not self._alive(target):
                        # Killed or cut off: its row stopped being renewed, so no
                        # answer can come; the operator need not wait out the deadline.
                        self.figures.timed_out += 1
                        waited = self.clock() - now
                        raise ForwardTimeout(
                            f"did not answer in {waited:.0f} s and stopped renewing its"
                            " liveness row (killed or cut off)"
                        )
                    self._waiting[req.call_id] = trio.Event()
            self.figures.timed_out += 1
            raise ForwardTimeout(f"did not answer in {timeout:g} s")
        finally:
            self._waiting.pop(req.call_id, None)
            self._answers.pop(req.call_id, None)

    def _alive(self, target: str) -> bool:
        try:
            return alive(self.conn, target, self.clock())
        except db.ERRORS as e:  # unknown: wait on to the deadline
            log.warning("forwarded call: reading releaser %s's row failed: %s", target, e)
            return True

    def _reread(self, call_id: str) -> Request | None:
        try:
            found = load(self.conn, [call_id])
        except db.ERRORS as e:
            log.warning("forwarded call %s: reading its row failed: %s", call_id, e)
            return None
        req = found[0] if found else None
        if req is None or decide(req, self.releaser_id, self.clock(), ()) != ANSWERED:
            return None
        return req

    async def notified(self, call_ids: list[str]) -> None:
        """The bus named these rows (or the catch-up found them). Raises ``db.ERRORS``."""
        found = await self.run_db(load, self.conn, call_ids)
        now = self.clock()
        for req in found:
            what = decide(req, self.releaser_id, now, self._running)
            if what == RUN:
                try:
                    self._send.send_nowait(req)
                except trio.WouldBlock:
                    pass  # still pending in the rows: the next catch-up offers it again
                else:
                    self._running.add(req.call_id)
            elif what == EXPIRE:
                self.figures.expired += 1
                await self.run_db(finish, self.conn, req.call_id, "expired", None)
            elif what == ANSWERED and req.call_id in self._waiting:
                self._answers[req.call_id] = req
                self._waiting[req.call_id].set()

    async def catch_up(self) -> None:
        """Offer the requests for this releaser still pending (the rows are the truth)."""
        await self.notified(
            await self.run_db(pending_for, self.conn, self.releaser_id, self.clock())
        )

    def trim(self) -> int:
        """The leader's cleanup: delete rows long past their deadline."""
        return trim(self.conn, self.clock() - KEEP_FOR)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the requests for this releaser until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for req in self._receive:
                nursery.start_soon(self._run, req)

    async def _run(self, req: Request) -> None:
        try:
            try:
                if not await self.run_db(claim, self.conn, req.call_id):
                    return
            except db.ERRORS as e:
                log.warning(
                    "forwarded call %s: cannot claim it (caught up later): %s", req.call_id, e
                )
                return
            state, answer = await self._execute(req)
            try:
                await self.run_db(finish, self.conn, req.call_id, state, answer)
            except db.ERRORS as e:
                log.warning("forwarded call %s: its answer was not written: %s", req.call_id, e)
                return
            self.figures.served += 1
            self.announce(req.call_id)
        finally:
            self._running.discard(req.call_id)

    async def _execute(self, req: Request) -> tuple[str, dict[str, Any]]:
        if self.runner is None:
            return "failed", {"error": "this releaser runs no forwarded calls yet"}
        with trio.move_on_after(max(req.deadline - self.clock(), 0)):
            try:
                return "done", await self.runner(req.method, req.operator, req.params, req.deadline)
            except FleetpushError as e:
                return "failed", {"error": str(e)}
            except Exception:  # a bug, or params of a newer releaser: never the bus task
                log.exception("forwarded call %s (%s) failed", req.call_id, req.method)
                return "failed", {"error": f"{req.method} failed on the releaser holding it"}
        return "failed", {"error": "the call did not finish before its deadline"}


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    """The runner without a pool: the call on the trio thread."""
    return fn(*args)


def _answer_of(req: Request) -> dict[str, Any]:
    """The answer of a finished request. Raises ForwardFailed (it failed or expired there)."""
    if req.state == "done" and req.answer is not None:
        return req.answer
    if req.state == "expired":
        raise ForwardFailed("the call reached it after its deadline")
    raise ForwardFailed(str((req.answer or {}).get("error") or "the call failed there"))
