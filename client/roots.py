"""The device's root of trust: provisioned, persisted, walked forward (specs/PROTOCOL.md §8.5).

A device is provisioned with root v1 (``root = "root-1.json"`` in agent.toml),
or with bare ``trusted_keys``, which act as an implicit root v0 (legacy mode,
protocol/root.py ``legacy_root``). The newest root it has trusted is kept in
``<state>/root.json`` (written atomically: temp file, fsync, rename), so a
restart never falls back to an older one.

When the releaser announces a newer root (``root_version`` in the hello
result) or a manifest is refused because no trusted key signed it, the device
walks: it asks ``get_root`` for each next version, checks each with
protocol/root.py ``update_root`` and persists it before asking for the next,
at most ``MAX_ROOT_WALK`` versions per walk. Each root accepted so may lower
the app's sequence high-water mark (``sequence_resets``, §8.5): the
``on_reset`` callable given to :meth:`TrustedRoots.walk` does that, in the
device state.

The trust decisions are protocol/root.py's; this module only reads, fetches
and writes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.messages import SignedManifest
from fleetpush.protocol.root import (
    MAX_ROOT_WALK,
    Root,
    VerifiedRoot,
    check_current,
    envelope_from_json,
    envelope_to_json,
    legacy_root,
    load_trusted_root,
    update_root,
)
from fleetpush.protocol.trust import TrustRoot

from .config import ConfigError, UpdaterConfig
from .fsutil import atomic_write_bytes

log = logging.getLogger("fleetpush.client.updater")

#: The newest trusted root inside the state directory.
ROOT_FILE = "root.json"

#: ``fetch(version)``: that root's envelope from the releaser, or None if it has none.
Fetch = Callable[[int], Awaitable[SignedManifest | None]]
#: ``on_reset(root)``: apply ``root.sequence_resets`` to the device state (§8.5).
OnReset = Callable[[Root], Awaitable[None]]


def _load(path: Path, what: str) -> VerifiedRoot:
    """Raises ConfigError naming ``path``."""
    try:
        return load_trusted_root(envelope_from_json(path.read_bytes()))
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it: {e.strerror or e}") from e
    except FleetpushError as e:
        raise ConfigError(f"{what} {path}: {e}") from e


class TrustedRoots:
    """The newest root this device trusts, and how to move it forward (see the module docstring)."""

    def __init__(self, current: VerifiedRoot, state_dir: Path) -> None:
        self.current = current
        self.path = Path(state_dir) / ROOT_FILE
        self._walking = trio.Lock()

    @classmethod
    def open(cls, config: UpdaterConfig) -> TrustedRoots:
        """The provisioned root, or the persisted one if newer.

        Raises ConfigError (no root and no trusted_keys; an unreadable or
        badly signed root file).
        """
        if config.root is not None:
            current = _load(config.root, "root")
        else:
            current = legacy_root(config.trust_root())
        persisted = Path(config.state_dir) / ROOT_FILE
        if persisted.exists():
            try:
                stored = _load(persisted, "persisted root")
            except ConfigError as e:
                # Written atomically, so only damage gets here: walking again from
                # the provisioned root restores it (the releaser serves the chain).
                log.warning("%s; walking again from root version %d", e, current.root.version)
            else:
                if stored.root.version > current.root.version:
                    current = stored
        return cls(current, config.state_dir)

    @property
    def version(self) -> int:
        return self.current.root.version

    def release_trust(self, now: float) -> TrustRoot:
        """The release keys to check a manifest with (§8.2 under §8.4).

        Raises ExpiredRoot if the newest trusted root has expired (python-tuf's
        rule; legacy root v0 never expires).
        """
        check_current(self.current.root, now)
        return self.current.root.trust("release")

    def timestamp_trust(self) -> TrustRoot | None:
        """The timestamp keys of the trusted root (§8.6), or None if it names none."""
        if self.current.root.timestamp is None:
            return None
        return self.current.root.trust("timestamp")

    async def walk(self, fetch: Fetch, on_reset: OnReset, *, target: int | None = None) -> int:
        """Fetch, verify and persist each next root up to ``target`` (or while any exists).

        Returns how many versions were accepted. One walk at a time; a
        concurrent caller waits and then sees the result. Raises the §8.4
        errors (RootError, RootRollback, BadSignature, UnknownKey,
        ThresholdNotMet: nothing past the last good root is trusted), what
        ``fetch`` raises, or a FilesystemError from persisting.
        """
        accepted = 0
        async with self._walking:
            while accepted < MAX_ROOT_WALK and (target is None or self.version < target):
                envelope = await fetch(self.version + 1)
                if envelope is None:
                    break
                verified = update_root(self.current.root, envelope)
                data = envelope_to_json(envelope)
                # Persist before using it: a crash never leaves a device trusting
                # a root it would not find again after a restart (§8.5).
                await trio.to_thread.run_sync(atomic_write_bytes, self.path, data, 0o600)
                self.current = verified
                accepted += 1
                log.info("trusting root version %d", verified.root.version)
                if verified.root.sequence_resets:
                    await on_reset(verified.root)
        return accepted


__all__ = ["ROOT_FILE", "TrustedRoots"]
