"""TLS between real trio peers on 127.0.0.1: pinning, CA trust and mutual TLS."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from fleetpush.net.tls import (
    ClientTls,
    ServerTls,
    TlsError,
    check_device_certificate,
    make_pki,
    peer_certificate,
    pem_fingerprint,
    server_context,
    wrap_client_stream,
    wrap_server_stream,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"), clients=["dev-1", "dev-2"])


async def _serve(
    server_tls: ServerTls,
    on_stream: Callable[[trio.SSLStream[trio.abc.Stream]], Awaitable[None]],
    errors: list[BaseException],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    ctx = server_context(server_tls)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            tls = await wrap_server_stream(stream, ctx, timeout=5)
        except TlsError as e:
            errors.append(e)
            return
        try:
            await on_stream(tls)
        except trio.BrokenResourceError as e:  # the client hung up (e.g. pin refused)
            errors.append(e)
        finally:
            await trio.aclose_forcefully(tls)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def _echo_once(stream: trio.SSLStream[trio.abc.Stream]) -> None:
    data = await stream.receive_some(100)
    await stream.send_all(data.upper())


async def _roundtrip(port: int, cfg: ClientTls) -> bytes:
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        tls = await wrap_client_stream(raw, cfg, host="127.0.0.1", timeout=5)
    except TlsError:
        await trio.aclose_forcefully(raw)
        raise
    try:
        await tls.send_all(b"ping")
        return await tls.receive_some(100)
    finally:
        await trio.aclose_forcefully(tls)


async def test_ca_trust_and_hostname(pki: dict[str, Path]) -> None:
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            srv = ServerTls(cert_file=pki["server_cert"], key_file=pki["server_key"])
            port = await nursery.start(partial(_serve, srv, _echo_once, errors))
            cfg = ClientTls(ca_file=pki["ca"], server_name="localhost")
            assert await _roundtrip(port, cfg) == b"PING"
            nursery.cancel_scope.cancel()
    assert errors == []


async def test_pin_accepts_matching_and_refuses_other(pki: dict[str, Path], tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            srv = ServerTls(cert_file=pki["server_cert"], key_file=pki["server_key"])
            port = await nursery.start(partial(_serve, srv, _echo_once, errors))
            good = ClientTls(pin_sha256=pem_fingerprint(pki["server_cert"]))
            assert await _roundtrip(port, good) == b"PING"
            bad = ClientTls(pin_sha256=pem_fingerprint(other["server_cert"]))
            with pytest.raises(TlsError, match="does not match the pin"):
                await _roundtrip(port, bad)
            # A CA the releaser's certificate does not chain to is refused in the handshake.
            with pytest.raises(TlsError, match="handshake"):
                await _roundtrip(port, ClientTls(ca_file=other["ca"]))
            nursery.cancel_scope.cancel()


async def test_mutual_tls_binds_certificate_to_device_id(pki: dict[str, Path]) -> None:
    seen: list[bytes | None] = []
    errors: list[BaseException] = []

    async def record(stream: trio.SSLStream[trio.abc.Stream]) -> None:
        seen.append(peer_certificate(stream))
        await _echo_once(stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            srv = ServerTls(
                cert_file=pki["server_cert"], key_file=pki["server_key"], client_ca=pki["ca"]
            )
            port = await nursery.start(partial(_serve, srv, record, errors))
            cfg = ClientTls(
                ca_file=pki["ca"], cert_file=pki["dev-1_cert"], key_file=pki["dev-1_key"]
            )
            assert await _roundtrip(port, cfg) == b"PING"
            # Without a client certificate the releaser refuses the handshake. With
            # TLS 1.3 the client learns it on its first read, not in do_handshake.
            with pytest.raises((TlsError, trio.BrokenResourceError)):
                await _roundtrip(port, ClientTls(ca_file=pki["ca"]))
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    assert len(seen) == 1
    check_device_certificate(seen[0], "dev-1")
    with pytest.raises(TlsError, match="not the claimed id"):
        check_device_certificate(seen[0], "dev-2")
    assert errors, "the handshake without a client certificate must fail on the server too"


def test_client_needs_something_to_trust() -> None:
    from fleetpush.net.tls import client_context

    with pytest.raises(TlsError, match="CA file or a certificate pin"):
        client_context(ClientTls())


def test_bad_files_are_wrapped(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="server TLS context"):
        server_context(ServerTls(cert_file=tmp_path / "nope.pem", key_file=tmp_path / "nope.key"))
