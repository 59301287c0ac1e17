"""The background scrub: the release store checked against its manifests, slowly.

Chunks are served without hashing them again (chunk_io.py, issue 14 item 3):
their digests were verified when the release was published (§7.4), and the
device verifies every chunk before it writes it, so a changed byte on the
releaser's disk is never installed. What would be lost is the releaser
*noticing*: devices would fail their downloads one after another with
nothing on the releaser saying why. The scrub reads every chunk of every
release that is not revoked, at most ``rate`` bytes per second (a whole pass
over a 10 GiB store takes about 21 minutes at the default 8 MiB/s), hashes it,
and compares it with the digest in the signed manifest. A release with a
chunk that differs, is short or cannot be read is *damaged*: ``get_chunks``
refuses it with ``UNAVAILABLE`` naming the scrub (device_api.py), and the
releaser logs one line and emits a ``scrub_failed`` event (``fleetpush
events``), so the operator republishes it instead of the fleet serving bad
bytes. The mark lives in memory: a restarted releaser serves the release
again until its next pass reaches it.

Everything the scrub needs comes in a :class:`ScrubContext` (callables), so
this module knows nothing of Services.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs
import trio
from fleetpush.protocol import IntegrityError, Manifest

from .chunk_io import read_verified_chunk

log = logging.getLogger("fleetpush.server")

#: The scrub's default read rate (bytes/s): small next to any disk's.
DEFAULT_SCRUB_RATE: Final = 8 * 1024 * 1024
#: Seconds from the end of one pass to the start of the next, by default.
DEFAULT_SCRUB_INTERVAL: Final = 6 * 3600.0


@attrs.frozen(kw_only=True)
class Damage:
    """A release the scrub found changed on disk: where, and why."""

    app: str
    version: str
    path: str
    chunk: int
    why: str

    def message(self) -> str:
        return f"{self.path} chunk {self.chunk}: {self.why}"


@attrs.frozen(kw_only=True)
class ScrubTarget:
    """One published release to check: its store directory and signed manifest."""

    app: str
    version: str
    dir: Path
    manifest: Manifest


@attrs.frozen(kw_only=True)
class ScrubContext:
    """What a scrub pass reads and whom it tells.

    ``targets`` lists the releases to check (read on the trio thread at the
    start of each release); ``report`` is told each damaged release once;
    ``rate`` caps the bytes read per second; ``interval`` separates passes.
    """

    targets: Callable[[], list[ScrubTarget]]
    report: Callable[[Damage], None]
    rate: float = DEFAULT_SCRUB_RATE
    interval: float = DEFAULT_SCRUB_INTERVAL


class Scrub:
    """What the scrub found so far (trio thread only)."""

    def __init__(self) -> None:
        #: damaged releases by store directory (str), never served again by this process
        self.damaged: dict[str, Damage] = {}
        self.passes = 0
        self.bytes_checked = 0

    def damage_of(self, release_dir: Path | str) -> Damage | None:
        return self.damaged.get(str(release_dir))

    async def run(self, ctx: ScrubContext) -> None:
        """Scrub pass after pass, ``ctx.interval`` apart (runs until cancelled)."""
        while True:
            await self.scrub_pass(ctx)
            await trio.sleep(ctx.interval)

    async def scrub_pass(self, ctx: ScrubContext) -> None:
        """Check every target once at ``ctx.rate``; report each newly damaged release."""
        pace = _Pace(ctx.rate)
        for target in ctx.targets():
            key = str(target.dir)
            if key in self.damaged:
                continue
            damage = await self._check(target, pace)
            if damage is not None and target.dir.is_dir():
                # (a directory gone meanwhile was removed, not damaged)
                self.damaged[key] = damage
                ctx.report(damage)
        self.passes += 1

    async def _check(self, target: ScrubTarget, pace: _Pace) -> Damage | None:
        manifest = target.manifest
        for entry in manifest.files:
            path = target.dir / entry.path
            for index, digest in enumerate(entry.chunks):
                # Fixed or content-defined chunks alike (§7.3.3).
                offset, length = entry.chunk_span(manifest.chunk_size, index)
                try:
                    await trio.to_thread.run_sync(
                        read_verified_chunk, path, offset, length, manifest.hash, digest
                    )
                except IntegrityError:
                    why = "its bytes on disk do not match the signed manifest"
                except OSError as e:
                    why = f"it cannot be read: {e.strerror or e}"
                else:
                    self.bytes_checked += length
                    await pace.after(length)
                    continue
                return Damage(
                    app=manifest.app, version=manifest.version, path=entry.path, chunk=index,
                    why=why,
                )  # fmt: skip
        return None


class _Pace:
    """Sleeps so that the bytes read since the pass began take at least bytes/rate seconds."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._start = trio.current_time()
        self._done = 0

    async def after(self, size: int) -> None:
        self._done += size
        if self._rate > 0:
            await trio.sleep_until(self._start + self._done / self._rate)
