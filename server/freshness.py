"""The releaser's freshness statements (specs/PROTOCOL.md §8.6), signed with its timestamp key.

A statement answers one nonce: the device's hello nonce (in the hello
result, and in every push command of that connection, naming the command),
or the nonce of a ``get_freshness`` request. It lists the newest release
sequence of the device's app per channel, as the device would be offered it
(§7.10), an expiry ``freshness_expiry`` seconds on, and a counter.

The counter is the releaser's clock in milliseconds, forced strictly
increasing within the process and never below the last one recorded in the
data dir (``meta.freshness_counter``, written at start), so a restart does
not make it go back unless the clock went back by more than the downtime.
"""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol.freshness import Freshness, command_digest, sign_freshness
from fleetpush.protocol.keys import KeyFormatError, private_key_from_pem
from fleetpush.protocol.messages import SignedManifest, UpdateCommand

from . import db
from .errors import ConfigError
from .releases import CHANNEL_STATUSES


def load_timestamp_key(path: Path) -> Ed25519PrivateKey:
    """Raises :class:`ConfigError` naming the file."""
    try:
        return private_key_from_pem(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"timestamp_key {path}: cannot read it: {e.strerror or e}") from e
    except KeyFormatError as e:
        raise ConfigError(f"timestamp_key {path}: {e}") from e


class FreshnessSigner:
    """Signs statements for one releaser (trio thread only)."""

    def __init__(
        self, key: Ed25519PrivateKey, server_id: str, expiry: float, conn: db.Connection
    ) -> None:
        self.key = key
        self.server_id = server_id
        self.expiry = expiry
        self.conn = conn
        recorded = int(db.get_meta(conn, "freshness_counter") or 0)
        self._counter = max(recorded, int(time.time() * 1000))
        db.set_meta(conn, "freshness_counter", str(self._counter))

    def _next(self, now: float) -> int:
        self._counter = max(self._counter + 1, int(now * 1000))
        return self._counter

    def sequences(self, app: str) -> dict[str, int]:
        """The newest release sequence of ``app`` per channel, as offered (§7.10)."""
        out = {}
        for channel, statuses in CHANNEL_STATUSES.items():
            marks = ",".join("?" * len(statuses))
            row = self.conn.execute(
                f"SELECT MAX(sequence) FROM releases WHERE app = ? AND status IN ({marks})",  # noqa: S608
                (app, *statuses),
            ).fetchone()
            out[channel] = int(row[0] or 0)
        return out

    def statement(
        self,
        nonce: bytes,
        app: str | None,
        *,
        now: float,
        command: tuple[str, UpdateCommand] | None = None,
        sequences: dict[str, int] | None = None,
    ) -> SignedManifest:
        """A signed statement answering ``nonce``, naming ``command`` (method, params) if given.

        ``sequences``: :meth:`sequences` of ``app`` if the caller read them
        already (off the trio thread: device_api.get_freshness); the counter
        and the signature are this object's, trio thread only.
        """
        if app and sequences is None:
            sequences = self.sequences(app)
        f = Freshness(
            server_id=self.server_id,
            counter=self._next(now),
            issued=int(now),
            expires=int(now + self.expiry),
            nonce=nonce,
            sequences={app: sequences or {}} if app else {},
            command=command_digest(*command) if command is not None else None,
        )
        return sign_freshness(f, [self.key])


__all__ = ["FreshnessSigner", "load_timestamp_key"]
