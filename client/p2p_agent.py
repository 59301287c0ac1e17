"""A device's side of LAN peer delivery, as the updater runs it (§7.11, issue 18).

Opt-in: ``p2p = true`` in the updater/agent config (off by default, and then
no port is opened and the releaser is never asked for peers). On, the device

* serves the releases it holds (staged, or installed) on ``p2p_listen``
  (client/p2p_serve.py), never while its app reports activity; and
* before each download asks the releaser for near peers (``get_peers``) and
  runs the peer pre-pass (client/p2p_fetch.py); the ordinary download then
  fetches the rest from the releaser. The pass is best effort: any failure of
  it is logged and the download goes on from the releaser alone.

Built from plain parts (config, layout, the trusted roots, callables); it
never imports the updater that holds it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Protocol

import attrs
import trio
from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.manifest import Manifest
from fleetpush.protocol.messages import SignedManifest
from fleetpush.protocol.p2p import GetPeers, PeerBytes, PeerList, ReportPeer
from fleetpush.protocol.trust import TrustRoot

from fleetpush.net.peer import Peer

from .activity_policy import Activity
from .config import UpdaterConfig
from .layout import StateLayout
from .p2p_fetch import FetchContext, PeerFetchResult, all_chunks, fetch_from_peers
from .p2p_serve import Held, ServeContext, serve_peers
from .staging import read_signed_manifest, unchanged_paths

log = logging.getLogger("fleetpush.client.p2p")

GET_PEERS_TIMEOUT = 10.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of ``p2p_listen``. Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"p2p_listen {text!r}: expected HOST:PORT, e.g. 0.0.0.0:7879")
    return host or "0.0.0.0", int(port)


def announced_host(configured: str | None, listen: str, stream: trio.abc.Stream) -> str | None:
    """Where this device tells the tracker peers can reach it (``get_peers.host``).

    ``p2p_host`` if set; else the ``p2p_listen`` host unless it is a wildcard;
    else the local address of the link to the releaser. Left to the releaser,
    the address it sees is a NAT router's behind NAT (tests/netns/sites.py),
    which its LAN peers cannot dial; the link's own address is the LAN
    address the device's default route uses. None if none can be read.
    """
    if configured:
        return configured
    host, _ = parse_listen(listen)
    if host not in ("0.0.0.0", "::", "[::]", ""):
        return host
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        try:
            return str(stream.socket.getsockname()[0])
        except OSError:
            return None
    return None


class _Roots(Protocol):
    def timestamp_trust(self) -> TrustRoot | None: ...


class _Ctx(Protocol):
    """The parts of the UpdateContext used here (context.py imports this module)."""

    @property
    def config(self) -> UpdaterConfig: ...
    @property
    def layout(self) -> StateLayout: ...
    @property
    def roots(self) -> _Roots: ...


class _Board(Protocol):
    @property
    def latest(self) -> Activity: ...


def activity_busy(board: _Board) -> Callable[[], bool]:
    """True while the app reports users or says it is busy (the activity gate's facts)."""

    def busy() -> bool:
        a = board.latest
        return a.busy or bool(a.users)

    return busy


@attrs.define
class DeviceP2P:
    config: UpdaterConfig
    layout: StateLayout
    #: the trusted root's timestamp keys (None: the root names none).
    trust: Callable[[], TrustRoot | None]
    key: object  # Ed25519PrivateKey (kept opaque here: only FetchContext uses it)
    serving: ServeContext | None = None
    port: int = 0
    last: PeerFetchResult | None = None
    last_version: str | None = None

    @classmethod
    def for_ctx(cls, ctx: _Ctx, key: object) -> DeviceP2P:
        return cls(config=ctx.config, layout=ctx.layout, trust=ctx.roots.timestamp_trust, key=key)

    async def after_download(self, link: Peer, m: Manifest, from_releaser: int) -> None:
        """Tell the releaser how the release arrived (``p2p_bytes``); best effort."""
        from_peers = self.last.bytes_from_peers if self.last else 0
        self.last_version = m.version
        params = PeerBytes(
            app=m.app, version=m.version, from_peers=from_peers, from_releaser=from_releaser
        )
        try:
            await link.notify("p2p_bytes", params)
        except FleetpushError as e:
            log.info("p2p: could not report delivery bytes: %s", e)

    def status(self) -> dict[str, object]:
        """Upload counters and the last pass, for ``fleetpush status`` (plain types)."""
        c = self.serving.counters if self.serving is not None else None
        return {
            "port": self.port if self.serving is not None else None,
            "bytes_uploaded": c.bytes_sent if c else 0,
            "chunks_uploaded": c.chunks_sent if c else 0,
            "peer_links": c.links if c else 0,
            "peers_refused": c.refused if c else 0,
            "last_bytes_from_peers": self.last.bytes_from_peers if self.last else 0,
            "last_dropped": dict(self.last.dropped) if self.last else {},
        }

    def holdings(self, app: str, version: str) -> Held | None:
        """The release if this device holds it whole: staged (marked) or installed."""
        if app != self.config.app:
            return None
        try:
            if self.layout.staged_marker(version).exists():
                signed = read_signed_manifest(self.layout.staged_manifest(version))
                if signed is not None:
                    m = Manifest.from_bytes(signed.signed)
                    return Held(signed, m, self.layout.staged_files(version))
            signed = read_signed_manifest(self.layout.installed_manifest)
            if signed is not None:
                m = Manifest.from_bytes(signed.signed)
                if m.version == version:
                    return Held(signed, m, Path(self.config.app_root))
        except (FleetpushError, OSError) as e:
            log.warning("p2p: cannot read what this device holds: %s", e)
        return None

    async def start(self, nursery: trio.Nursery, busy: Callable[[], bool]) -> None:
        """Listen for peers (``p2p_listen``); a bind failure is logged, not fatal."""
        cfg = self.config
        self.serving = ServeContext(
            device_id=cfg.device_id,
            trust=self.trust,
            holdings=self.holdings,
            now=time.time,
            busy=busy,
            max_peers=cfg.p2p_max_peers,
            max_rate=cfg.p2p_max_rate,
        )
        host, port = parse_listen(cfg.p2p_listen)
        try:
            self.port = await nursery.start(serve_peers, self.serving, host, port)
        except OSError as e:
            log.error("fleetpush: p2p: cannot listen on %s: %s", cfg.p2p_listen, e.strerror or e)
            self.serving = None
            return
        log.info("p2p: serving held releases to peers on %s:%d", host, self.port)

    async def before_download(
        self, link: Peer, signed: SignedManifest, m: Manifest, installed: Manifest | None = None
    ) -> None:
        """Ask the releaser for peers and fetch what they have into staging."""
        cfg = self.config
        try:
            with trio.fail_after(GET_PEERS_TIMEOUT):
                answer: PeerList = await link.request(
                    "get_peers",
                    GetPeers(
                        app=m.app,
                        version=m.version,
                        subnet=cfg.p2p_subnet,
                        host=announced_host(cfg.p2p_host, cfg.p2p_listen, link.stream),
                        port=self.port if self.serving is not None else 0,
                    ),
                )
        except (FleetpushError, trio.TooSlowError) as e:
            log.info("p2p: no peers from the releaser: %s", e)
            return
        if not answer.peers or answer.token is None:
            return
        # Which peers the tracker chose, and where it says they serve: what an
        # operator (and tests/netns/test_p2p_sites.py) checks "near" against.
        log.info(
            "p2p: peers for %s: %s",
            m.version,
            ", ".join(f"{p.device_id}@{p.host}:{p.port}" for p in answer.peers),
        )

        async def report(peer: str, reason: str) -> None:
            params = ReportPeer(app=m.app, version=m.version, peer_id=peer, reason=reason)
            try:
                with trio.fail_after(GET_PEERS_TIMEOUT):
                    await link.request("report_peer", params)
            except (FleetpushError, trio.TooSlowError) as e:
                log.warning("p2p: could not report peer %s: %s", peer, e)

        # Files unchanged since the installed release are copied locally by
        # the download: never asked of peers.
        same = unchanged_paths(m, installed)
        wanted: dict[Hashable, int] = {
            k: n
            for k, n in all_chunks(m).items()
            if isinstance(k, tuple) and m.files[k[0]].path not in same
        }
        ctx = FetchContext(device_id=cfg.device_id, key=self.key, report=report)  # type: ignore[arg-type]
        try:
            self.last = await fetch_from_peers(
                ctx,
                answer.peers,
                token=answer.token,
                manifest=m,
                files_dir=self.layout.staged_files(m.version),
                missing=wanted,
            )
        except (FleetpushError, OSError) as e:
            log.warning("p2p: peer pass stopped: %s", e)
            return
        log.info(
            "p2p: %d bytes of %s from peers; dropped: %s",
            self.last.bytes_from_peers,
            m.version,
            self.last.dropped or "none",
        )


__all__ = ["DeviceP2P", "announced_host", "parse_listen"]
