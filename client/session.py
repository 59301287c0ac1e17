"""The device's link to the releaser: connect, authenticate, stay connected.

A :class:`ReleaserLink` runs forever (until cancelled): it dials the releaser
(:func:`fleetpush.net.dial.dial`: TCP, optionally TLS, ``hello`` as a device and
the releaser's nonce signed with the device key, specs/PROTOCOL.md §5), then
keeps the connection open; heartbeats and the idle deadline are driven by the
connection's own timers through :mod:`fleetpush.net.peer`. When the link drops,
or cannot be made, it retries with capped exponential backoff and full
jitter, logging one line per state change, never raising: the app around it
keeps running whatever the network does (fail-soft).

Releaser commands (``__force_update__`` / ``__apply_update__``) are handed to
a callback which must answer quickly with an :class:`Ack`; the work happens
elsewhere and reports through ``update_progress``.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol.errors import ErrorCode, FleetpushError, RpcError
from fleetpush.protocol.events import RequestReceived
from fleetpush.protocol.freshness import NONCE_SIZE
from fleetpush.protocol.keys import (
    KeyFormatError,
    private_key_from_pem,
    private_key_to_pem,
    public_bytes,
)
from fleetpush.protocol.messages import Ack, Hello, HelloResult, UpdateCommand

from fleetpush.net.dial import Dialed, dial, format_address, parse_address
from fleetpush.net.keys import generate_private_key
from fleetpush.net.peer import Peer, TransportError
from fleetpush.net.tls import ClientTls

from .app_remote import RemoteApp
from .config import UpdaterConfig
from .errors import StateError, UpdaterError
from .failover import attempt_order, device_order, failed_over, next_wait
from .fsutil import atomic_write_bytes
from .journal import crash_point
from .layout import StateLayout

log = logging.getLogger("fleetpush.client.session")

#: Session states, in the order a healthy session goes through them.
STATES: Final = (
    "idle",
    "connecting",
    "connected",
    "backoff",
    "pending",
    "rejected",
    "duplicate",
    "stopped",
)

#: The least wait after the releaser said another device uses this id (§5.5):
#: the two would otherwise keep taking the session from each other.
DUPLICATE_BACKOFF: Final = 60.0

#: A connection that stayed up this long resets the backoff.
STABLE_AFTER: Final = 10.0

CommandHandler = Callable[[str, UpdateCommand], Awaitable[Ack]]
ConnectedHandler = Callable[[Peer], Awaitable[None]]


class Unreachable(UpdaterError):
    """The releaser could not be reached (or did not answer) in time."""


class NotAccepted(Unreachable):
    """The releaser answers but does not let this device in: enrolment pending or rejected.

    An :class:`Unreachable` for callers that only wait and retry; the console
    exits 4 for it, not 3 (README.md, "Exit codes").
    """


# --- the device key ------------------------------------------------------------------


def load_or_create_device_key(state_dir: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """``<state>/device.key``, generated (Ed25519, mode 0600) on first start.

    Raises :class:`StateError` if the file exists but is not an Ed25519 PEM
    key (never silently replaced: the releaser knows the device by it).
    """
    path = StateLayout.of(state_dir).device_key
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = generate_private_key()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, private_key_to_pem(key), 0o600)
        log.info("generated device key %s", path)
        return key
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        key = private_key_from_pem(data)
    except KeyFormatError as e:
        raise StateError(f"{path}: {e}") from e
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("%s was readable by others; mode set to 0600", path)
    return key


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter in [delay/2, delay]."""
    delay = min(cap, initial * math.pow(2.0, min(attempt, 30)))
    return rng.uniform(delay / 2, delay)


# --- the session --------------------------------------------------------------------------


class ReleaserLink:
    """A self-healing connection to the releaser (see the module docstring)."""

    def __init__(
        self,
        config: UpdaterConfig,
        key: Ed25519PrivateKey,
        *,
        hello: Callable[[], Hello],
        on_command: CommandHandler | None = None,
        on_connected: ConnectedHandler | None = None,
        tls: ClientTls | None = None,
        rng: random.Random | None = None,
        remote_app: RemoteApp | None = None,
    ) -> None:
        self.config = config
        #: answers the releaser's app requests (app_remote.py); embedded: refuses them.
        self.remote_app = remote_app or RemoteApp(None)
        #: the current link's tasks (cancelled when it closes)
        self._link_tasks: trio.Nursery | None = None
        self.key = key
        self.public_key = public_bytes(key)
        self._hello = hello
        self._on_command = on_command
        self._on_connected = on_connected
        self._tls = tls
        self._rng = rng or random.Random()
        self.state = "idle"
        self.detail = ""
        self.peer: Peer | None = None
        #: the hello result of the live connection (§5.1): root version, freshness.
        self.server_hello: HelloResult | None = None
        #: the nonce our hello of the current connection carried (§8.6).
        self.hello_nonce: bytes | None = None
        self.connects = 0
        #: the releaser address (as configured) of the live link, or None.
        self.releaser: str | None = None
        #: the address being dialled or served (log lines name it).
        self._target = self.config.servers[0]
        self._shown = self._target
        #: the address that last gave an accepted link (stickiness, failover.py).
        self._last_good: str | None = None
        self._order = device_order(self.config.servers, self.config.device_id)
        self._connected = trio.Event()
        self._kick = trio.Event()
        self._refusal: str | None = None

    def _set_state(self, state: str, detail: str = "") -> None:
        # What the releaser last said of this device, kept across the retries
        # that follow: a wait that ends while the next attempt is connecting
        # still says "not accepted yet", not "cannot reach" (exit 4, not 3).
        if state in ("pending", "rejected"):
            self._refusal = state
        elif state == "connected":
            self._refusal = None
        # a new address is a new line too: "connecting" to B after A refused
        if (state, detail, self._target) != (self.state, self.detail, self._shown):
            self.state, self.detail, self._shown = state, detail, self._target
            where = format_address(*parse_address(self._target))
            log.info("releaser %s: %s%s", where, state, f" ({detail})" if detail else "")

    # --- for the updater -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.peer is not None and not self.peer.closed.is_set()

    def kick(self) -> None:
        """Skip the rest of the current backoff: someone needs the releaser now."""
        self._kick.set()

    async def wait_connected(self, timeout: float) -> Peer:
        """The live peer, waiting at most ``timeout``. Raises :class:`Unreachable`."""
        with trio.move_on_after(timeout):
            while True:
                peer = self.peer
                if peer is not None and not peer.closed.is_set():
                    return peer
                self.kick()
                await self._connected.wait()
        refusal = self.state if self.state in ("pending", "rejected") else self._refusal
        if refusal == "pending":
            raise NotAccepted(
                f"the releaser at {self._where} has not accepted device "
                f"{self.config.device_id} yet [an operator runs: fleetpush devices accept "
                f"{self.config.device_id}]"
            )
        if refusal == "rejected":
            raise NotAccepted(
                f"the releaser at {self._where} refused device "
                f"{self.config.device_id}: {self.detail}"
            )
        why = self._last_error or self.detail or self.state
        if why.startswith("cannot reach the releaser"):  # DialError's words already
            raise Unreachable(f"{why} (gave up after {timeout:g}s)")
        raise Unreachable(f"cannot reach the releaser at {self._where} within {timeout:g}s: {why}")

    @property
    def _where(self) -> str:
        """The releaser(s) for error messages: the only one, or every address."""
        servers = self.config.servers
        return servers[0] if len(servers) == 1 else ", ".join(servers)

    async def request(self, method: str, params: object, timeout: float) -> object:
        """One request within ``timeout`` overall (connecting included).

        Raises :class:`Unreachable` (no link, or no answer in time) or
        :class:`RpcError` (the releaser answered with an error).
        """
        deadline = trio.current_time() + timeout
        peer = await self.wait_connected(timeout)
        remaining = max(0.05, deadline - trio.current_time())
        try:
            return await peer.request(method, params, timeout=remaining)
        except trio.TooSlowError as e:
            raise Unreachable(f"releaser did not answer {method} within {timeout:g}s") from e
        except TransportError as e:
            raise Unreachable(f"link lost during {method}: {e}") from e

    async def notify(self, method: str, params: object) -> bool:
        """Send a notification if connected; False if it could not be sent."""
        peer = self.peer
        if peer is None or peer.closed.is_set():
            return False
        try:
            await peer.notify(method, params)
        except (TransportError, FleetpushError) as e:
            log.debug("could not send %s: %s", method, e)
            return False
        return True

    # --- the loop ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect; forever. Never raises (but Cancelled)."""
        task_status.started()
        if len(self.config.servers) > 1:
            await self._run_failover()
            return
        attempt = 0
        try:
            while True:
                started = trio.current_time()
                await self._attempt(self._target)
                if trio.current_time() - started >= STABLE_AFTER and self.state == "connected":
                    attempt = 0
                delay = backoff_delay(
                    attempt, self.config.backoff_initial, self.config.backoff_max, self._rng
                )
                attempt += 1
                await self._wait_to_retry(delay)
        finally:
            self.peer = None
            self._set_state("stopped")

    async def _wait_to_retry(self, delay: float) -> None:
        """Sleep ``delay`` (longer after a duplicate-id refusal), or until kicked;
        status says why unless the releaser's own answer is showing."""
        if self.state == "duplicate":
            delay = max(delay, DUPLICATE_BACKOFF * (0.5 + self._rng.random()))
        if self.state not in ("pending", "rejected", "duplicate"):
            self._set_state("backoff", f"{self._last_error}; retry in {delay:.1f}s")
        self._kick = trio.Event()
        with trio.move_on_after(delay):
            await self._kick.wait()

    async def _attempt(self, address: str) -> None:
        """One dial of ``address`` and its link, to the end; records the outcome.

        Never raises (but Cancelled): the error goes to ``_last_error``.
        """
        self._target = address
        self._set_state("connecting")
        try:
            await self._connect_once(address)
        except (OSError, FleetpushError, trio.TooSlowError) as e:
            reason = "timed out" if isinstance(e, trio.TooSlowError) else str(e)
            if self.state != "duplicate":  # keep the releaser's sentence in status
                self.detail = ""
            log.debug("connection attempt to %s failed: %s", address, reason, exc_info=True)
            self._last_error = reason or type(e).__name__
        except Exception as e:  # fail-soft: a bug here must not take the app down
            log.exception("unexpected error in the releaser session")
            self._last_error = repr(e)
        else:
            self._last_error = self.detail or "closed"

    async def _run_failover(self) -> None:
        """:meth:`run` for several releasers: rounds over the addresses (failover.py).

        A round tries the last good address, then the others in this device's
        order, stopping at the first that gives a link. Between failed rounds:
        exponential backoff with full jitter; after a live link dropped: a
        jittered spread before the next round (issue 15, §2).
        """
        cfg = self.config
        round_no = 0
        try:
            while True:
                dropped = False
                for address in attempt_order(self._order, self._last_good):
                    connects = self.connects
                    started = trio.current_time()
                    await self._attempt(address)
                    if self.connects != connects:  # it was up, and has dropped
                        dropped = True
                        if trio.current_time() - started >= STABLE_AFTER:
                            round_no = 0
                        break
                    if self.state in ("pending", "rejected", "duplicate"):
                        break  # the fleet's answer, not this releaser's: wait it out
                delay = next_wait(
                    round_no,
                    dropped=dropped,
                    base=cfg.backoff_initial,
                    cap=cfg.backoff_max,
                    spread=cfg.reconnect_spread,
                    rng=self._rng,
                )
                round_no += 1
                await self._wait_to_retry(delay)
        finally:
            self.peer = None
            self._set_state("stopped")

    async def _connect_once(self, address: str) -> None:
        tls = self._tls if self._tls is not None else self.config.client_tls()
        # A fresh nonce per connection: the releaser's freshness statements and
        # signed commands answer it, so none is valid on another connection (§8.6).
        self.hello_nonce = os.urandom(NONCE_SIZE)
        hello = attrs.evolve(self._hello(), nonce=self.hello_nonce)
        try:
            async with dial(
                address,
                self.key,
                hello,
                tls=tls,
                timeout=self.config.connect_timeout,
                handshake_timeout=2 * self.config.connect_timeout,
                heartbeat=self.config.heartbeat,
                on_request=self._on_request,
            ) as link:
                await self._serve(link)
        except RpcError as e:
            if e.code in (ErrorCode.AUTH_FAILED, ErrorCode.REJECTED, ErrorCode.FORBIDDEN):
                self._set_state("rejected", e.message)
            elif e.code == ErrorCode.PENDING:
                self._set_state("pending", "an operator must accept this device")
            elif e.code == ErrorCode.CONFLICT:
                # Another device runs with this id (a cloned image?): say it
                # loudly and stay away long enough for the other one to keep
                # its session (server/fleet.py, specs/PROTOCOL.md §5.5).
                log.warning("the releaser refused this device: %s", e.message)
                self._set_state("duplicate", e.message)
            raise

    async def _serve(self, link: Dialed) -> None:
        """Stay on an authenticated link until it closes; the states say how it went."""
        peer, result = link.peer, link.hello
        if link.auth.status != "accepted":
            if link.auth.status == "pending":
                self._set_state("pending", "an operator must accept this device")
            else:
                self._set_state("rejected", "the releaser rejected this device")
            return
        # §6.2: the releaser's heartbeat, when it names one, replaces our own.
        if result.heartbeat > 0:
            peer.conn.heartbeat = result.heartbeat
        self.connects += 1
        self.server_hello = result
        self.peer = peer
        if failed_over(self._last_good, self._target):
            log.warning("failed over from releaser %s to %s", self._last_good, self._target)
        self._last_good = self.releaser = self._target
        self._set_state("connected", f"cid {result.cid}")
        event, self._connected = self._connected, trio.Event()
        event.set()
        try:
            async with trio.open_nursery() as nursery:
                self._link_tasks = nursery
                if self._on_connected is not None:
                    nursery.start_soon(self._run_on_connected, peer)
                await peer.wait_closed()
                nursery.cancel_scope.cancel()
        finally:
            self.peer = None
            self.server_hello = None
            self.releaser = None
            self._link_tasks = None
        self.detail = peer.close_reason or "closed"

    async def _run_on_connected(self, peer: Peer) -> None:
        assert self._on_connected is not None
        try:
            await self._on_connected(peer)
        except (FleetpushError, trio.TooSlowError) as e:
            log.info("after connecting: %s", e)

    async def _on_request(self, peer: Peer, event: RequestReceived) -> None:
        if event.method in ("__force_update__", "__apply_update__") and self._on_command:
            assert isinstance(event.params, UpdateCommand)
            ack = await self._on_command(event.method, event.params)
            await peer.respond(event.id, ack)
            if ack.accepted:
                crash_point("push-after-ack")  # tests: the push must already be on disk
            return
        if event.method in ("__app_control__", "__app_logs__") and self._link_tasks is not None:
            tasks = self._link_tasks
            try:
                answer = await self.remote_app.handle(
                    peer, event.method, event.params, tasks.start_soon
                )
            except RpcError as e:
                await peer.respond_error(event.id, e.code, e.message)
            else:
                await peer.respond(event.id, answer)
            return
        await peer.respond_error(event.id, ErrorCode.METHOD_NOT_FOUND, f"{event.method} not served")

    _last_error: str = ""


__all__ = [
    "STATES",
    "NotAccepted",
    "ReleaserLink",
    "Unreachable",
    "backoff_delay",
    "load_or_create_device_key",
]
