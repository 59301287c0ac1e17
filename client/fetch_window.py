"""How many bytes a download keeps outstanding, and how it splits them (§7.3).

A pure decision, kept apart from the downloader that acts on it.

``window`` counts chunks of the manifest's ``chunk_size``. For content-defined
chunks that is their *maximum* (256 KiB, server/chunking.py), four times
smaller than the fixed 1 MiB chunk: the same ``window`` then kept a quarter of
the bytes in flight, in four times as many ``get_chunks`` requests per GiB
(1 MiB each, about 16 chunks). Each request costs the releaser a release
lookup, a read-ahead task and a response: with content-defined chunks that
per-request cost was most of its 4 CPU s/GiB (issue 14, item 2). So the
window counts in units of at least :data:`WINDOW_UNIT` bytes: the bytes in
flight (and so the device's memory for them) are what fixed chunks already
use, whatever the chunking.
"""

from __future__ import annotations

from typing import Final

#: The least bytes one unit of ``window`` stands for (the fixed chunk size).
WINDOW_UNIT: Final = 1024 * 1024


def window_sizes(
    window: int, chunk_size: int, chunks_per_request: int, requests_in_flight: int
) -> tuple[int, int]:
    """``(window_bytes, request_bytes)``: bytes outstanding, and per request.

    A request asks for at least ``chunks_per_request`` units (when that many
    are wanted) and at least its share of the window.
    """
    unit = max(chunk_size, WINDOW_UNIT)
    window_bytes = max(1, window) * unit
    request_bytes = max(
        min(chunks_per_request, window) * unit, window_bytes // max(1, requests_in_flight)
    )
    return window_bytes, request_bytes
