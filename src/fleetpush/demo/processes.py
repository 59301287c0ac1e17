"""Child processes for the demo and the bench: the releaser and device agents.

Every child is started through :class:`Children`, which always cleans up:
on leaving the block (normally, on an error, on Ctrl-C) each child gets
SIGTERM, then SIGKILL after a grace period, sent to its whole process group,
so an agent's app and anything it forked go too. Children run
``python -m fleetpush.cli.main ...`` with this interpreter, so the demo works
from any install without ``fleetpush`` on PATH.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

from fleetpush.protocol import FleetpushError

LISTENING_RE: Final = re.compile(r"listening on (\S+):(\d+)")
#: the line `fleetpush server` prints before ``listening on`` when it serves TLS
PIN_RE: Final = re.compile(r"^tls pin: ([0-9a-f]{64})$", re.MULTILINE)
FLEETPUSH: Final = (sys.executable, "-m", "fleetpush.cli.main")


class ChildError(FleetpushError):
    """A child process failed to start or died."""


def peak_rss(pid: int) -> int:
    """Peak resident set size of ``pid`` in bytes (VmHWM), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def self_peak_rss() -> int:
    return peak_rss(os.getpid())


class Child:
    """One started child; output goes to ``log`` (a file in the workspace)."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log
        #: copies stdout into the log once the releaser reported its port
        self.drain: threading.Thread | None = None
        #: the releaser's certificate pin (``tls pin:`` line); None over plain TCP
        self.tls_pin: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace``; returns the exit code."""
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5.0)
        # anything left in the group (an app the agent could not stop) goes too
        _signal_group(self.popen.pid, signal.SIGKILL)
        if self.drain is not None:
            self.drain.join(5.0)
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None and not (self.drain is not None and pipe is self.popen.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()
        return self.popen.returncode


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Children:
    """Starts children and guarantees they are all gone when the block ends."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.children: list[Child] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def stop_all(self, grace: float = 5.0) -> None:
        # agents first (they stop their apps), the releaser last
        for child in reversed(self.children):
            child.stop(grace)
        self.children.clear()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
    ) -> Child:
        log = self.logdir / f"{name}.log"
        self.logdir.mkdir(parents=True, exist_ok=True)
        out = log.open("ab")
        try:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else out,
                stderr=out,
                start_new_session=True,  # its own process group: killpg reaches its children
            )
        except OSError as e:
            raise ChildError(f"cannot start {name}: {e}") from e
        finally:
            out.close()
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    def start_server(
        self,
        data_dir: Path,
        *,
        operator_keys: Sequence[str],
        insecure: bool,
        release_keys: Sequence[str] = (),
        extra: Sequence[str] = (),
        name: str = "releaser",
        timeout: float = 20.0,
    ) -> tuple[Child, str, int]:
        """Start ``fleetpush server`` on 127.0.0.1 port 0; returns (child, host, port).

        Reads its ``listening on HOST:PORT`` line. Without ``insecure`` the
        releaser serves TLS (its default) and ``child.tls_pin`` holds the pin
        it printed before that line; with it, plain TCP (``--insecure``), which
        every caller must ask for by name. Raises :class:`ChildError`.
        """
        argv = [*FLEETPUSH, "server", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"]
        if insecure:
            argv.append("--insecure")
        for k in operator_keys:
            argv += ["--operator-key", k]
        for k in release_keys:
            argv += ["--release-key", k]
        argv += list(extra)
        child = self.start(name, argv, stdout_pipe=True)
        assert child.popen.stdout is not None
        found = _read_listening(child.popen.stdout, timeout)
        if found is None:
            child.stop(1.0)
            raise ChildError(
                f"the releaser did not report 'listening on HOST:PORT' within {timeout:.0f}s:\n"
                + child.log_tail()
            )
        host, port, seen = found
        child.drain = _drain_to(child.popen.stdout, child.log, seen)
        if not insecure:
            pin = PIN_RE.search(seen.decode(errors="replace"))
            if pin is None:
                child.stop(1.0)
                raise ChildError("the releaser printed no 'tls pin:' line:\n" + child.log_tail())
            child.tls_pin = pin.group(1)
        return child, host, port


def _read_listening(stream: IO[bytes], timeout: float) -> tuple[str, int, bytes] | None:
    result: list[tuple[str, int, bytes]] = []
    seen = bytearray()

    def reader() -> None:
        for raw in iter(stream.readline, b""):
            seen.extend(raw)
            m = LISTENING_RE.search(raw.decode(errors="replace"))
            if m:
                result.append((m.group(1), int(m.group(2)), bytes(seen)))
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else None


def _drain_to(stream: IO[bytes], log: Path, first: bytes) -> threading.Thread:
    """Copy the rest of a child's stdout into its log, so the pipe never fills."""

    def drain() -> None:
        with stream, log.open("ab") as out:
            out.write(first)
            for raw in iter(stream.readline, b""):
                out.write(raw)
                out.flush()

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return thread


def wait_for(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    """Poll a callable until it returns true or ``timeout`` passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE to at least ``want`` if allowed; returns the soft limit now.

    Children inherit it, so call this before starting a releaser that must hold
    many connections. Root may raise the hard limit too.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    target = want
    if hard != resource.RLIM_INFINITY and want > hard and os.geteuid() != 0:
        target = hard
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= target else target
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, new_hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
