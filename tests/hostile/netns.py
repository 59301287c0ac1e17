"""Two network namespaces joined by a veth pair, for real link faults (root only).

Both ends live in namespaces this harness creates; the root namespace's
interfaces are never touched. Addresses come from 192.0.2.0/24 (TEST-NET-1):
side ``a`` is 192.0.2.1, side ``b`` is 192.0.2.2. ``tc`` tbf limits the rate
(this kernel has no netem), ``ip link set down/up`` cuts and restores the
link. Processes run inside a namespace with ``ip netns exec``.

Cleanup always happens: ``NetnsPair`` is a context manager that deletes both
namespaces (which destroys the veth and kills nothing else) and kills every
process it started, even when the body fails. ``unavailable()`` returns the
reason namespaces cannot be made here, for a clear ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
from types import TracebackType

ADDR_A = "192.0.2.1"
ADDR_B = "192.0.2.2"
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=20)


def unavailable() -> str | None:
    """Why namespaces cannot be created here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns, veth, tc)"
    name = f"fph-probe-{os.getpid()}"
    try:
        proc = _ip("netns", "add", name, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run ip: {e}"
    if proc.returncode != 0:
        return f"ip netns add failed: {proc.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class NetnsPair:
    """Namespaces ``a`` and ``b`` joined by veth, with optional tbf rate limit."""

    def __init__(self) -> None:
        n = next(_counter)
        # The pid in the name lets a later run remove namespaces of a killed one.
        self.ns_a = f"fph-{os.getpid()}x{n}-a"
        self.ns_b = f"fph-{os.getpid()}x{n}-b"
        # Interface names are limited to 15 bytes (and live inside the namespaces).
        self.dev_a = f"fpa{os.getpid():x}x{n}"[:15]
        self.dev_b = f"fpb{os.getpid():x}x{n}"[:15]
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> NetnsPair:
        try:
            _ip("netns", "add", self.ns_a)
            _ip("netns", "add", self.ns_b)
            _ip(
                "link", "add", self.dev_a, "netns", self.ns_a,
                "type", "veth", "peer", "name", self.dev_b, "netns", self.ns_b,
            )  # fmt: skip
            for ns, dev, addr in ((self.ns_a, self.dev_a, ADDR_A), (self.ns_b, self.dev_b, ADDR_B)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # --- shaping and faults ---------------------------------------------------------

    def limit_rate(self, mbit: float, *, burst_kbit: int = 64, latency_ms: int = 100) -> None:
        """tbf on both veth ends: ``mbit`` Mbit/s each way."""
        for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
            subprocess.run(
                [
                    "tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", f"{mbit}mbit", "burst", f"{burst_kbit}kbit",
                    "latency", f"{latency_ms}ms",
                ],
                check=True, capture_output=True, timeout=20,
            )  # fmt: skip

    def link_down(self) -> None:
        _ip("-n", self.ns_a, "link", "set", self.dev_a, "down")
        _ip("-n", self.ns_b, "link", "set", self.dev_b, "down")

    def link_up(self) -> None:
        _ip("-n", self.ns_a, "link", "set", self.dev_a, "up")
        _ip("-n", self.ns_b, "link", "set", self.dev_b, "up")

    def tx_bytes(self, side: str = "a") -> int:
        """Bytes the veth end of ``side`` transmitted (all retransmissions included)."""
        ns, dev = (self.ns_a, self.dev_a) if side == "a" else (self.ns_b, self.dev_b)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/tx_bytes"],
            check=True, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        return int(out.stdout)

    # --- processes ----------------------------------------------------------------------

    def popen(self, side: str, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside namespace ``side`` ('a' or 'b'); killed at cleanup."""
        ns = self.ns_a if side == "a" else self.ns_b
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def run(
        self, side: str, argv: list[str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        ns = self.ns_a if side == "a" else self.ns_b
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout
        )

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self.procs.clear()
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "del", ns, check=False)
