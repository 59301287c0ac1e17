"""A lean fleet of idle devices for ``bench --idle``: one selectors loop, no trio.

The trio fleet (fleet.py) spends 220-290 us of CPU per device on a push
(a reader task woken, a handler task started, a scheduler round each), more
than the releaser it measures, and its N devices share 2 cores with the
releaser; so on this machine the push latency measured the workers (issue
15). These devices are real ones on the wire, driven by the same sans-IO
:class:`~fleetpush.protocol.Connection` as the updater: each handshakes with
its own Ed25519 key (hello, auth), adopts the releaser's heartbeat and pings
on it (§6.2), answers pings, and acknowledges ``__force_update__`` /
``__apply_update__`` at once (a real device persists the command first,
§7.4; the bench has nothing to persist). Handshakes run one at a time,
blocking, before the loop starts.

Speaks fleet.py's line protocol for what the idle bench asks: prints
``{"ready": n}``, then ``arm``, ``collect TIMEOUT``, ``rss``, ``quit``.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time
from typing import Any

from fleetpush.client.download import capabilities
from fleetpush.net.keys import generate_private_key
from fleetpush.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    ErrorReceived,
    RequestReceived,
    ResponseReceived,
    Side,
    auth_payload,
    sign_challenge,
)
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Ack, Auth, Hello

from ..demo.processes import self_peak_rss

RECEIVE = 64 * 1024
#: seconds between two looks at every link's heartbeat timer
TIMER_STEP = 1.0
COMMANDS = ("__force_update__", "__apply_update__")


class LeanFleet:
    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.sel = selectors.DefaultSelector()
        self.links: dict[int, tuple[socket.socket, Connection]] = {}
        self.arrivals: list[float] = []
        self.armed = False
        self.collect_until: float | None = None
        self.stdin_buf = b""
        self.running = True

    # --- connecting --------------------------------------------------------------

    def connect_all(self) -> None:
        job = self.job
        deadline = time.monotonic() + float(job.get("connect_timeout", 120))
        for i in range(int(job["devices"])):
            if time.monotonic() > deadline:
                raise SystemExit(f"lean fleet: {i} devices connected before the deadline")
            self.connect_one(f"{job['prefix']}-{i:04d}")
            if i % 256 == 255:  # serve the links already open while the rest connect
                self.poll(0)
                self.timers(time.monotonic())

    def connect_one(self, device_id: str) -> None:
        job = self.job
        key = generate_private_key()
        source = (job["local_address"], 0) if job.get("local_address") else None
        sock = socket.create_connection(
            (job["host"], int(job["port"])), timeout=60, source_address=source
        )
        conn = Connection(Side.CLIENT, now=time.monotonic())
        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            role="device",
            peer_id=device_id,
            public_key=public_bytes(key),
            app=job["app"],
            version="0.0.1",
            channel="stable",
            capabilities=capabilities(),
        )
        hello_result = _call(sock, conn, "hello", hello)
        payload = auth_payload(
            server_id=hello_result.server_id,
            cid=hello_result.cid,
            nonce=hello_result.nonce,
            role="device",
            peer_id=device_id,
            public_key=hello.public_key,
        )
        auth = _call(sock, conn, "auth", Auth(signature=sign_challenge(key, payload)))
        if auth.status != "accepted":
            raise SystemExit(f"{device_id}: enrollment {auth.status}")
        if hello_result.heartbeat > 0:  # adopted as the updater does (client/session.py)
            conn.heartbeat = hello_result.heartbeat
        sock.setblocking(False)
        self.links[sock.fileno()] = (sock, conn)
        self.sel.register(sock, selectors.EVENT_READ, sock.fileno())

    # --- the loop ----------------------------------------------------------------

    def run(self) -> None:
        self.connect_all()
        _answer({"ready": len(self.links)})
        os.set_blocking(sys.stdin.fileno(), False)
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, -1)
        next_timers = time.monotonic()
        while self.running:
            now = time.monotonic()
            if now >= next_timers:
                self.timers(now)
                next_timers = now + TIMER_STEP
            timeout = next_timers - now
            if self.collect_until is not None:
                timeout = min(timeout, max(0.0, self.collect_until - now))
            self.poll(timeout)
            self.check_collect()

    def poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            fd = key.data
            if fd == -1:
                self.stdin()
            else:
                self.readable(fd)

    def readable(self, fd: int) -> None:
        sock, conn = self.links[fd]
        try:
            data = sock.recv(RECEIVE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        now = time.monotonic()
        conn.receive_data(data, now)
        out = bytearray()
        while (ev := conn.next_event()) is not NEED_DATA:
            if isinstance(ev, RequestReceived):
                if ev.method in COMMANDS and self.armed:
                    self.arrivals.append(now)
                out += conn.send_response(ev.id, Ack(accepted=True))
            elif isinstance(ev, ConnectionClosed):
                self.drop(fd)
                return
        out += conn.data_to_send()  # pongs
        if out:
            self.send(fd, bytes(out))

    def send(self, fd: int, data: bytes) -> None:
        sock, _ = self.links[fd]
        try:
            sent = sock.send(data)
            if sent < len(data):  # rare: a few bytes on an idle link; finish blocking
                sock.setblocking(True)
                sock.sendall(data[sent:])
                sock.setblocking(False)
        except OSError:
            self.drop(fd)

    def timers(self, now: float) -> None:
        for fd, (_, conn) in list(self.links.items()):
            timer = conn.get_timer()
            if timer is not None and timer <= now:
                try:
                    conn.handle_timer(now)
                except Exception:  # the releaser went silent: this device is gone
                    self.drop(fd)
                    continue
                data = conn.data_to_send()
                if data:
                    self.send(fd, data)

    def drop(self, fd: int) -> None:
        link = self.links.pop(fd, None)
        if link is not None:
            self.sel.unregister(link[0])
            link[0].close()

    # --- commands ----------------------------------------------------------------

    def stdin(self) -> None:
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:
            self.running = False
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            self.command(line.decode().split())

    def command(self, cmd: list[str]) -> None:
        if not cmd:
            return
        if cmd[0] == "arm":
            self.arrivals = []
            self.armed = True
            _answer({"armed": True})
        elif cmd[0] == "collect":
            self.collect_until = time.monotonic() + float(cmd[1])
        elif cmd[0] == "rss":
            _answer({"rss": self_peak_rss()})
        elif cmd[0] == "quit":
            self.running = False
        else:
            _answer({"error": f"{cmd[0]} is not served by the lean fleet"})

    def check_collect(self) -> None:
        if self.collect_until is None:
            return
        if len(self.arrivals) >= len(self.links) or time.monotonic() >= self.collect_until:
            self.collect_until = None
            self.armed = False
            _answer({"times": self.arrivals})


def _call(sock: socket.socket, conn: Connection, method: str, params: object) -> Any:
    """Send one request on a blocking socket and return its result (handshake only)."""
    rid, data = conn.send_request(method, params)
    sock.sendall(data)
    while True:
        chunk = sock.recv(RECEIVE)
        if not chunk:
            raise SystemExit(f"the releaser closed the connection during {method}")
        conn.receive_data(chunk, time.monotonic())
        while (ev := conn.next_event()) is not NEED_DATA:
            if isinstance(ev, ResponseReceived) and ev.id == rid:
                return ev.result
            if isinstance(ev, ErrorReceived):
                raise SystemExit(f"{method} refused: {ev.message}")


def _answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(job: dict[str, Any]) -> None:
    LeanFleet(job).run()
