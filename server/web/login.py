"""Dashboard sign-in: one-time login links signed by an operator key, and web sessions.

Design (issue 16): no password is stored anywhere. ``fleetpush operator
web-login`` signs a short-lived token with the operator's Ed25519 key (the
same key the releaser already trusts for the operator role, §5.2); the
releaser checks it against ``operator_keys``, refuses a nonce it has seen
(one-time), and opens a web session recorded under the same label a CLI
connection gets, ``name (key prefix)``, so the audit history names the
operator identically whichever way they acted.

Token: ``base64url(claims JSON) "." base64url(signature)``; the signature is
over the exact claims bytes under :data:`DOMAIN` (never a re-encoding, STYLE
§3). Everything here is pure: time and randomness are passed in.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Final

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import FleetpushError
from fleetpush.protocol.errors import BadSignature
from fleetpush.protocol.keys import public_bytes, sign, verify

#: Separates these signatures from auth and manifest signatures made by the same key.
DOMAIN: Final = b"fleetpush-web-login-v1\x00"
#: Longest lifetime a login token may claim, whatever its signer asked for.
MAX_TTL: Final = 3600.0
#: How long a web session lasts without being used.
SESSION_IDLE: Final = 8 * 3600.0
#: Web sessions kept at once; the oldest is dropped beyond this.
MAX_SESSIONS: Final = 1000


class LoginError(FleetpushError):
    """A login token was refused (malformed, unknown key, bad signature, expired, reused)."""


def make_token(
    key: Ed25519PrivateKey, name: str, *, now: float, nonce: bytes, ttl: float = 600.0
) -> str:
    """A login token for operator ``name`` valid for ``ttl`` seconds from ``now``."""
    claims = json.dumps(
        {
            "name": name,
            "key": public_bytes(key).hex(),
            "exp": int(now + min(ttl, MAX_TTL)),
            "nonce": nonce.hex(),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    sig = sign(key, DOMAIN, claims)
    return f"{_b64(claims)}.{_b64(sig)}"


@attrs.frozen
class Login:
    """A verified token: who signed in, and until when the token was valid."""

    label: str
    nonce: str
    expires: float


def check_token(token: str, operator_keys: list[bytes], *, now: float) -> Login:
    """Verify ``token``; the operator it names. Raises :class:`LoginError`.

    Does not check reuse: :class:`SessionStore.login` does, as it holds the
    nonces already used.
    """
    try:
        head, _, tail = token.strip().partition(".")
        claims_bytes, sig = _unb64(head), _unb64(tail)
        claims = json.loads(claims_bytes)
        name, key_hex = str(claims["name"]), str(claims["key"])
        exp, nonce = float(claims["exp"]), str(claims["nonce"])
        key = bytes.fromhex(key_hex)
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise LoginError("the login token is malformed") from e
    if key not in operator_keys:
        raise LoginError(f"key {key_hex[:16]} is not an operator key of this releaser")
    try:
        verify(key, sig, DOMAIN, claims_bytes)
    except BadSignature as e:
        raise LoginError("the login token's signature does not verify") from e
    if exp <= now:
        raise LoginError(
            "the login token has expired [make a new one: fleetpush operator web-login]"
        )
    if exp > now + MAX_TTL + 60:
        raise LoginError("the login token claims too long a lifetime")
    if not name or len(name) > 64:
        raise LoginError("the login token names no operator")
    return Login(label=f"{name} ({key_hex[:16]})", nonce=nonce, expires=exp)


@attrs.define
class WebSession:
    """One signed-in browser."""

    operator: str
    csrf: str
    last_used: float
    #: a message shown once on the next page (the outcome of an action).
    flash: str = ""


class SessionStore:
    """Web sessions by cookie value, and the login nonces already used (in memory).

    Sessions do not survive a releaser restart: operators sign in again. The
    used nonces are kept until their token would have expired anyway.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, WebSession] = {}
        self._used: dict[str, float] = {}

    def login(self, login: Login, *, now: float, session_id: str, csrf: str) -> WebSession:
        """Open a session for a verified token. Raises :class:`LoginError` (token reused)."""
        self._used = {n: exp for n, exp in self._used.items() if exp > now}
        if login.nonce in self._used:
            raise LoginError("this login link was used already [make a new one]")
        self._used[login.nonce] = login.expires
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda s: self._sessions[s].last_used)
            del self._sessions[oldest]
        session = WebSession(operator=login.label, csrf=csrf, last_used=now)
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str | None, *, now: float) -> WebSession | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if now - session.last_used > SESSION_IDLE:
            del self._sessions[session_id]
            return None
        session.last_used = now
        return session

    def logout(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


def csrf_ok(session: WebSession, sent: str | None) -> bool:
    """The form's (or header's) CSRF token is this session's (constant-time)."""
    return sent is not None and hmac.compare_digest(session.csrf.encode(), sent.encode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
