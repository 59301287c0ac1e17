"""TLS for the releaser link: contexts, pinning, device certificates.

What each mode protects (specs/THREATS.md, "transport"):

- **plain TCP** (``--insecure`` / ``insecure = true`` on both ends): nothing
  on the wire is secret, and a relay can read, drop or *rewrite* requests
  after the signed handshake (revoke a release, reject a device, push, forge
  device reports). It still cannot make a device install anything unsigned:
  manifests are signed by release keys and every chunk is checked against
  them. For closed networks only.
- **TLS, server authenticated** (``ca_file`` or ``pin_sha256`` on the client):
  the default. ``fleetpush server`` makes a self-signed certificate on first
  start (:func:`ensure_self_signed`) and prints its pin. Adds confidentiality
  and integrity of every message and stops a relay from impersonating the
  releaser.
- **mutual TLS** (``client_ca`` on the server, a device certificate on the
  client): additionally only devices holding a certificate from the fleet CA
  can connect at all, and the certificate's name must equal the device id the
  device claims in ``hello``.

Everything here wraps :mod:`ssl` and :mod:`cryptography`; their exceptions
are re-raised as :class:`TlsError`.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
from pathlib import Path

import attrs
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetpush.protocol import FleetpushError


class TlsError(FleetpushError):
    """A TLS context could not be built, or a peer certificate was refused."""


@attrs.frozen(kw_only=True)
class ServerTls:
    cert_file: Path
    key_file: Path
    #: CA that signs device/operator certificates; set for mutual TLS.
    client_ca: Path | None = None


@attrs.frozen(kw_only=True)
class ClientTls:
    #: CA (or self-signed releaser certificate) to trust.
    ca_file: Path | None = None
    #: hex SHA-256 of the releaser certificate (DER); checked after the handshake.
    #: Several pins: any of them matches (issue 15: releasers with their own
    #: self-signed certificates serving one fleet; a shared CA is the other way).
    pin_sha256: str | tuple[str, ...] | None = None
    #: our certificate and key, for mutual TLS.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: name to check in the releaser certificate; None checks nothing but the pin/CA.
    server_name: str | None = None


def server_context(cfg: ServerTls) -> ssl.SSLContext:
    """An SSLContext for the releaser. Raises :class:`TlsError`."""
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        if cfg.client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(cfg.client_ca))
    except (OSError, ssl.SSLError, ValueError) as e:
        raise TlsError(f"cannot build the server TLS context: {e}") from e
    return ctx


def client_context(cfg: ClientTls) -> ssl.SSLContext:
    """An SSLContext for devices and operators. Raises :class:`TlsError`.

    With only a pin, chain verification is off and :func:`check_pin` must be
    called after the handshake (the adapters do); with a CA the chain is
    verified, and the name too when ``server_name`` is set.
    """
    if cfg.ca_file is None and cfg.pin_sha256 is None:
        raise TlsError("TLS needs a CA file or a certificate pin to trust the releaser")
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cfg.ca_file is not None:
            ctx.load_verify_locations(cafile=str(cfg.ca_file))
            ctx.check_hostname = cfg.server_name is not None
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.cert_file is not None:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise TlsError(f"cannot build the client TLS context: {e}") from e
    return ctx


def fingerprint(der: bytes) -> str:
    """Hex SHA-256 of a DER certificate (the form ``pin_sha256`` takes)."""
    return hashlib.sha256(der).hexdigest()


def check_pin(der: bytes | None, pin_sha256: str | tuple[str, ...]) -> None:
    """Raise :class:`TlsError` unless the peer certificate matches the pin (any of them)."""
    if der is None:
        raise TlsError("the releaser presented no certificate")
    pins = (pin_sha256,) if isinstance(pin_sha256, str) else pin_sha256
    got = fingerprint(der)
    # every pin is compared (no early exit), so the time says nothing of which matched
    matched = [hmac.compare_digest(got, p.replace(":", "").strip().lower()) for p in pins]
    if not any(matched):
        which = "the pin" if len(pins) == 1 else f"any of the {len(pins)} pins"
        raise TlsError(f"releaser certificate {got[:16]}... does not match {which}")


def certificate_names(der: bytes) -> set[str]:
    """The subject common name and DNS subjectAltNames of a DER certificate."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise TlsError(f"unreadable peer certificate: {e}") from e
    names = {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names.update(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return names


def check_device_certificate(der: bytes | None, device_id: str) -> None:
    """Mutual TLS: the client certificate must name the device id it claims."""
    if der is None:
        raise TlsError("no client certificate presented")
    names = certificate_names(der)
    if device_id not in names:
        raise TlsError(
            f"client certificate names {sorted(names)}, not the claimed id {device_id!r}"
        )


# --- a small PKI for tests, demos and closed networks --------------------------------


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_private(path, _key_pem(key), 0o600)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    sans: list[x509.GeneralName],
    usage: list[x509.ObjectIdentifier],
    days: int,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(
    out: Path,
    *,
    server_names: list[str] | None = None,
    clients: list[str] | None = None,
    days: int = 825,
) -> dict[str, Path]:
    """Write a CA, a releaser certificate and client certificates into ``out``.

    Returns the paths by role: ``ca``, ``ca_key``, ``server_cert``,
    ``server_key``, and ``<name>_cert``/``<name>_key`` per client. Names that
    parse as IP addresses go into IP subjectAltNames.
    """
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    try:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert("fleetpush CA", ca_key, None, ca_key, ca=True, sans=[], usage=[], days=days)
        paths["ca"], paths["ca_key"] = out / "ca.pem", out / "ca.key"
        paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        _write_key(paths["ca_key"], ca_key)

        def issue(label: str, cn: str, sans: list[str], usage: x509.ObjectIdentifier) -> None:
            key = ec.generate_private_key(ec.SECP256R1())
            general = _general_names(sans)
            cert = _cert(
                cn, key, ca.subject, ca_key, ca=False, sans=general, usage=[usage], days=days
            )
            paths[f"{label}_cert"] = out / f"{label}.pem"
            paths[f"{label}_key"] = out / f"{label}.key"
            paths[f"{label}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            _write_key(paths[f"{label}_key"], key)

        names = server_names or ["localhost", "127.0.0.1"]
        issue("server", names[0], names, ExtendedKeyUsageOID.SERVER_AUTH)
        for client in clients or []:
            issue(client, client, [client], ExtendedKeyUsageOID.CLIENT_AUTH)
    except (OSError, ValueError) as e:
        raise TlsError(f"cannot write the PKI into {out}: {e}") from e
    return paths


#: Where ``fleetpush server`` keeps the certificate it makes itself (README, "TLS").
SELF_SIGNED_DIR = "tls"
SELF_SIGNED_CERT = "releaser.pem"
SELF_SIGNED_KEY = "releaser.key"


def default_server_names() -> list[str]:
    """The names a self-signed releaser certificate carries unless told more.

    Loopback in every spelling and this machine's host name, so that a CA-style
    check (``tls_ca`` set to the certificate itself, with a server name) also
    passes on the machine and on the LAN under the host name.
    """
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    return names


def self_signed_paths(data_dir: Path) -> tuple[Path, Path]:
    """``(cert, key)`` of the releaser's own certificate under ``data_dir``."""
    folder = data_dir / SELF_SIGNED_DIR
    return folder / SELF_SIGNED_CERT, folder / SELF_SIGNED_KEY


def ensure_self_signed(
    data_dir: Path, names: list[str], *, days: int = 3650
) -> tuple[Path, Path, bool]:
    """The releaser's self-signed certificate and key, made on first use.

    Returns ``(cert, key, created)``. An existing pair is reused as it is, so
    the pin printed at the first start stays valid (devices pinned it); extra
    ``names`` given later do not re-issue it (delete both files to re-issue,
    and hand every device and operator the new pin). The key is created mode
    0600 (never readable by others, not even for a moment), and the
    certificate is written last: a start that dies half way leaves at most a
    key, which the next start replaces, never a certificate whose key is gone.
    Its validity is long (10 years) because clients pin it rather than check
    dates; re-issuing is the operator's decision, not a clock's.

    Raises :class:`TlsError` (unwritable folder, a certificate without its key).
    """
    cert_path, key_path = self_signed_paths(data_dir)
    if cert_path.exists():
        if not key_path.exists():
            raise TlsError(
                f"{cert_path} exists but its key {key_path} does not: restore the key, or "
                "delete the certificate to make a new one (and a new pin)"
            )
        return cert_path, key_path, False
    try:
        cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        general = _general_names(names)
        cn = names[0] if names else "fleetpush releaser"
        cert = _cert(
            cn,
            key,
            None,
            key,
            ca=False,
            sans=general,
            usage=[ExtendedKeyUsageOID.SERVER_AUTH],
            days=days,
        )
        _write_private(key_path, _key_pem(key), 0o600)
        _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except (OSError, ValueError) as e:
        raise TlsError(f"cannot create the releaser certificate in {cert_path.parent}: {e}") from e
    return cert_path, key_path, True


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, created with ``mode`` from the start.

    Raises OSError.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _general_names(names: list[str]) -> list[x509.GeneralName]:
    """subjectAltNames: IP addresses as IPAddress, everything else as DNSName."""
    general: list[x509.GeneralName] = []
    for s in dict.fromkeys(names):
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            general.append(x509.DNSName(s))
    return general


def pem_fingerprint(path: Path) -> str:
    """SHA-256 pin of a PEM certificate file."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise TlsError(f"cannot read certificate {path}: {e}") from e
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


# --- trio adapters -------------------------------------------------------------------


async def wrap_client_stream(
    stream: trio.abc.Stream, cfg: ClientTls, *, host: str, timeout: float = 10.0
) -> trio.SSLStream[trio.abc.Stream]:
    """Run the TLS handshake as a client, then check the pin. Raises :class:`TlsError`."""
    ctx = client_context(cfg)
    ssl_stream = trio.SSLStream(
        stream, ctx, server_hostname=cfg.server_name or host, https_compatible=False
    )
    try:
        with trio.fail_after(timeout):
            await ssl_stream.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError, OSError) as e:
        await trio.aclose_forcefully(ssl_stream)
        raise TlsError(f"TLS handshake with the releaser failed: {_cause(e)}") from e
    if cfg.pin_sha256 is not None:
        try:
            check_pin(ssl_stream.getpeercert(binary_form=True), cfg.pin_sha256)
        except TlsError:
            await trio.aclose_forcefully(ssl_stream)
            raise
    return ssl_stream


async def wrap_server_stream(
    stream: trio.abc.Stream, ctx: ssl.SSLContext, *, timeout: float = 10.0
) -> trio.SSLStream[trio.abc.Stream]:
    """Run the TLS handshake as the releaser. Raises :class:`TlsError`."""
    ssl_stream = trio.SSLStream(stream, ctx, server_side=True, https_compatible=False)
    try:
        with trio.fail_after(timeout):
            await ssl_stream.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError, OSError) as e:
        await trio.aclose_forcefully(ssl_stream)
        raise TlsError(f"TLS handshake failed: {_cause(e)}") from e
    return ssl_stream


def peer_certificate(stream: trio.abc.Stream) -> bytes | None:
    """DER certificate the peer presented over ``stream``, if it is TLS."""
    if isinstance(stream, trio.SSLStream):
        der = stream.getpeercert(binary_form=True)
        return der if isinstance(der, bytes) else None
    return None


def _cause(e: BaseException) -> str:
    inner = e.__cause__ or e.__context__
    return f"{e}: {inner}" if inner is not None and str(inner) else str(e) or type(e).__name__
