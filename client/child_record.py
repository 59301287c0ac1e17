"""The agent's app child on record, so that a child left behind is stopped.

``fleetpush agent`` killed with SIGKILL (kill -9, the OOM killer) cannot stop
its child: the app lives on, keeps its port, and the next agent's app
crash-loops on "address already in use" while a health command is answered
by the orphan (issue 11, item 1). Three defences, each covering what the
others cannot:

1. **One process group.** The agent starts the app with
   ``start_new_session=True``, so one ``killpg`` reaches the app and whatever
   it spawned (:func:`signal_group`).
2. **A record.** ``<state>/agent-child.json`` (:attr:`StateLayout.child_record`)
   holds the child's pid, its start time (field 22 of ``/proc/PID/stat``,
   clock ticks since boot) and its process group, written atomically when
   the child starts and removed when it is stopped. A starting agent that
   finds one stops that group (SIGTERM, ``stop_timeout``, SIGKILL) before it
   starts its own child (:func:`stop_leftover`). A pid alone is never
   trusted: a pid that was reused has another start time.
3. **A parent-death guard.** ``PR_SET_PDEATHSIG`` would be the natural
   tool, but the kernel sends it when *the thread* that forked the child
   exits (prctl(2)), and trio forks from a worker thread that its thread
   cache retires after 10 s idle: the app would be killed ten seconds after
   each start. ``setpriv --pdeathsig`` inherits the same parent thread, and
   a ``preexec_fn`` calling prctl is unsafe in a threaded process. So the
   agent starts a tiny guard (:data:`GUARD_SOURCE`, ``python -I -S -c``) in
   its own session, holding the read end of a pipe whose only write end is
   the agent's: when the agent dies, however it dies, the guard reads EOF and
   stops the app's group if the leader still has its recorded start time.
   On a clean stop the agent kills the guard first, so it never acts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Final

import attrs
import trio

from .errors import UpdaterError
from .fsutil import atomic_write_json, read_json

log = logging.getLogger("fleetpush.client.agent")

#: How often a leftover group is looked at while it stops.
_POLL: Final = 0.05

#: Waiting for a SIGKILLed group to go (the kernel is quick; a D-state process is not).
_KILL_WAIT: Final = 5.0


def proc_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (start time, clock ticks after boot) of a live process.

    None if there is no such process or it has exited and is a zombie. Never raises.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")":
    # the fields after the last ")" start at field 3 (state).
    rest = stat.rpartition(b")")[2].split()
    try:
        state, start = rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None
    return None if state in (b"Z", b"X") else start


def same_process(pid: int, start_time: int) -> bool:
    """True if ``pid`` is alive and is the process that started at ``start_time``."""
    return pid > 0 and proc_start_time(pid) == start_time


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid``; False if the group is gone. Never raises."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@attrs.frozen(kw_only=True)
class ChildRecord:
    """The agent's app child, as written to ``agent-child.json``."""

    pid: int
    start_time: int
    pgid: int
    agent_pid: int
    agent_start_time: int | None
    command: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {**attrs.asdict(self), "command": list(self.command)}

    @classmethod
    def from_json(cls, doc: object) -> ChildRecord:
        """Raises ValueError if ``doc`` is not a record."""
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        try:
            ast = doc.get("agent_start_time")
            return cls(
                pid=int(doc["pid"]),
                start_time=int(doc["start_time"]),
                pgid=int(doc["pgid"]),
                agent_pid=int(doc["agent_pid"]),
                agent_start_time=None if ast is None else int(ast),
                command=tuple(str(c) for c in doc.get("command", ())),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"missing or bad field: {e}") from e


def record_child(path: Path, pid: int, command: tuple[str, ...]) -> ChildRecord | None:
    """Write the record of child ``pid`` (its own group leader) atomically.

    Returns it, or None if the child is already gone. Raises
    :class:`~fleetpush.client.errors.FilesystemError` if it cannot be written.
    """
    start = proc_start_time(pid)
    if start is None:
        return None
    me = os.getpid()
    rec = ChildRecord(
        pid=pid,
        start_time=start,
        pgid=pid,  # start_new_session: the child leads its own group
        agent_pid=me,
        agent_start_time=proc_start_time(me),
        command=command,
    )
    atomic_write_json(path, rec.to_json(), 0o600)
    return rec


def forget_child(path: Path) -> None:
    """Remove the record (the child was stopped and reaped). Never raises."""
    with contextlib.suppress(FileNotFoundError):
        try:
            path.unlink()
        except OSError as e:
            log.warning("cannot remove %s: %s", path, e.strerror or e)


def live_child(path: Path) -> ChildRecord | None:
    """The recorded child if it is alive and is that child (pid and start time), else None.

    Reads only (``fleetpush status`` with no agent running): a pid alone is
    never trusted, it may have been reused. Never raises.
    """
    try:
        rec = ChildRecord.from_json(read_json(path))
    except (OSError, UpdaterError, ValueError):
        return None
    return rec if same_process(rec.pid, rec.start_time) else None


async def stop_leftover(path: Path, stop_timeout: float) -> str | None:
    """Stop the app child a previous agent left behind; returns what was found and done.

    None if there is no record. The record is removed once dealt with.
    Raises :class:`UpdaterError` if the agent that wrote it is still running
    (two agents on one state dir: stopping the other's app would be wrong).
    """
    try:
        doc = read_json(path)
    except FileNotFoundError:
        return None
    except (UpdaterError, ValueError) as e:
        forget_child(path)
        return f"ignored an unreadable child record {path}: {e}"
    try:
        rec = ChildRecord.from_json(doc)
    except ValueError as e:
        forget_child(path)
        return f"ignored a bad child record {path}: {e}"
    other = rec.agent_pid != os.getpid() and rec.agent_start_time is not None
    if other and same_process(rec.agent_pid, rec.agent_start_time or 0):
        raise UpdaterError(
            f"another agent (pid {rec.agent_pid}) runs app pid {rec.pid} "
            f"for this state directory; stop it first"
        )
    if not same_process(rec.pid, rec.start_time):
        forget_child(path)
        return (
            f"child record of a previous agent: pid {rec.pid} is gone "
            "(or now another process); nothing to stop"
        )
    how = await _stop_group(rec, stop_timeout)
    forget_child(path)
    return (
        f"stopped the app left by a previous agent (pid {rec.agent_pid}): "
        f"pid {rec.pid}, process group {rec.pgid}, {how}"
    )


async def _stop_group(rec: ChildRecord, stop_timeout: float) -> str:
    """SIGTERM the group, wait ``stop_timeout`` for its leader, then SIGKILL it."""
    signal_group(rec.pgid, signal.SIGTERM)
    how = "stopped by SIGTERM"
    with trio.move_on_after(stop_timeout):
        while same_process(rec.pid, rec.start_time):
            await trio.sleep(_POLL)
    if same_process(rec.pid, rec.start_time):
        how = f"SIGKILL after {stop_timeout:g}s"
        signal_group(rec.pgid, signal.SIGKILL)
        with trio.move_on_after(_KILL_WAIT):
            while same_process(rec.pid, rec.start_time):
                await trio.sleep(_POLL)
        if same_process(rec.pid, rec.start_time):
            how = "still alive after SIGKILL"
    else:
        # Whatever the leader spawned and left in its group goes with it. The
        # group id cannot be handed to a new process while members remain.
        signal_group(rec.pgid, signal.SIGKILL)
    return how


#: The parent-death guard (see the module docstring): ``argv = [pid, start_time, grace]``.
#: It blocks on stdin; EOF means the agent is gone, so it stops the app's group.
GUARD_SOURCE: Final = """\
import os, signal, sys, time
pid, start, grace = int(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
def leader():
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            rest = f.read().rpartition(b")")[2].split()
    except OSError:
        return False
    return rest[19] == start and rest[0] not in (b"Z", b"X")
while os.read(0, 512):
    pass
if leader():
    try:
        os.killpg(pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while leader() and time.monotonic() < end:
            time.sleep(0.05)
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def guard_command(rec: ChildRecord, stop_timeout: float) -> list[str]:
    """The argv of the guard of ``rec``'s child (run with a pipe as its stdin)."""
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        GUARD_SOURCE,
        str(rec.pid),
        str(rec.start_time),
        f"{stop_timeout:g}",
    ]


__all__ = [
    "GUARD_SOURCE",
    "ChildRecord",
    "forget_child",
    "guard_command",
    "proc_start_time",
    "record_child",
    "same_process",
    "signal_group",
    "stop_leftover",
]
