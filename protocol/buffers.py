"""Reusable receive buffers for DATA frame bodies (issue 14, item 1).

A device receives a release as thousands of chunk-sized DATA frames. Giving
each its own fresh ``bytearray`` costs a page fault per 4 KiB (fresh pages
are zero-filled by the kernel) and, with the growing buffers that protect
the releaser from lying headers (frames.py), two early copies per frame. A
:class:`DataPool` hands the decoder a buffer that is already mapped, the
body is received into it once, and the same buffer is then hashed and
written by the downloader: one pass over the bytes.

A pooled buffer is free again when nothing refers to it but the pool: the
frame's ``memoryview`` payload (and everything derived from it) keeps the
buffer alive, so a buffer can never be reused while a consumer still reads
it, and a consumer that drops a frame (a cancelled stream) needs no
explicit release. This relies on CPython's reference counting, which the
project requires anyway (msgpack, trio).

The pool is bounded in bytes: a releaser declaring the largest chunk size on
every frame cannot make the device hold more than ``limit`` in pooled
buffers; past it, frames fall back to the decoder's growing buffers.
"""

from __future__ import annotations

import sys
from typing import Final

#: Buffers are allocated in multiples of this, so one buffer serves the
#: chunks of a release whose sizes vary a little (the last chunk of a file,
#: content-defined chunks below the maximum).
_GRAIN: Final = 64 * 1024

#: References to a free buffer: the pool's list and getrefcount's argument.
_FREE_REFS: Final = 2


class DataPool:
    """Up to ``limit`` bytes of reusable DATA body buffers (device side).

    All buffers have one size: the largest body seen so far, rounded up to
    64 KiB. Content-defined chunks vary from frame to frame; buffers sized
    to each would be evicted and allocated again and again (fresh pages,
    the cost the pool exists to avoid), while one size class lets any free
    buffer take any chunk of the release.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffers: list[bytearray] = []
        self._next = 0  # where the next scan starts: buffers free up in order
        self.size = 0
        self.allocated = 0

    def acquire(self, length: int) -> bytearray | None:
        """A free buffer of at least ``length`` bytes, or None (use a growing one)."""
        if length > self.size:
            self.size = -(-length // _GRAIN) * _GRAIN
            self._evict_free()  # too small for the new size class
        buffers = self._buffers
        n = len(buffers)
        small = False
        for k in range(n):  # not enumerate(): its cached tuple is one more reference
            i = (self._next + k) % n
            buf = buffers[i]
            if sys.getrefcount(buf) <= _FREE_REFS + 1:  # + the local name
                if len(buf) >= length:
                    self._next = (i + 1) % n
                    return buf
                small = True  # of an older size class, in use when the size grew
        if small:
            self._evict_free()
        if self.allocated + self.size > self.limit:
            return None
        buf = bytearray(self.size)
        buffers.append(buf)
        self.allocated += self.size
        return buf

    def _evict_free(self) -> None:
        keep = []
        for i in range(len(self._buffers)):
            buf = self._buffers[i]
            if len(buf) >= self.size or sys.getrefcount(buf) > _FREE_REFS + 1:
                keep.append(buf)  # a buffer in use is dropped once its frame is
            else:
                self.allocated -= len(buf)
        self._buffers = keep
        self._next = 0

    def __len__(self) -> int:
        """Buffers held."""
        return len(self._buffers)

    @property
    def in_use(self) -> int:
        """Pooled buffers some frame still refers to (for tests)."""
        return sum(1 for buf in self._buffers if sys.getrefcount(buf) > _FREE_REFS + 1)
