"""Every size and count limit of the wire protocol (specs/PROTOCOL.md §10).

Limits are checked before memory is committed: a frame's declared length is
compared with the maximum before any body byte is buffered, and msgpack is
unpacked with explicit ``max_*_len`` bounds so a small hostile body cannot
make the decoder allocate megabytes.
"""

from __future__ import annotations

from typing import Final

#: Largest body of a message frame (msgpack). A manifest of a multi-GiB release
#: with 1 MiB chunks is well under this.
MAX_MESSAGE_BODY: Final = 8 * 1024 * 1024

#: Largest chunk a data frame may carry.
MAX_CHUNK_SIZE: Final = 4 * 1024 * 1024

#: Bytes of reusable DATA body buffers a device keeps (protocol/buffers.py):
#: about 20 chunks of 1 MiB, more than a download keeps in flight (client/
#: download.py bounds that in bytes), so in steady state every chunk is
#: received into a buffer that is already mapped.
DATA_POOL_BYTES: Final = 24 * 1024 * 1024

#: Default chunk size of new releases.
DEFAULT_CHUNK_SIZE: Final = 1024 * 1024

#: Smallest chunk size a manifest may declare (keeps per-chunk overhead sane).
MIN_CHUNK_SIZE: Final = 4 * 1024

#: msgpack bounds: the longest array or map, string and binary value.
MAX_ARRAY_LEN: Final = 100_000
MAX_MAP_LEN: Final = 10_000
MAX_STR_LEN: Final = 64 * 1024
MAX_BIN_LEN: Final = MAX_MESSAGE_BODY

#: msgpack nesting is bounded by the library's own recursion limit and, more
#: tightly, by the shapes we accept; a body nesting deeper than this is refused.
MAX_NESTING: Final = 32

#: Arrays and maps one message may contain in all. An empty array is one byte
#: on the wire but ~60 in memory: without this bound an 8 MiB body of nested
#: empty arrays decodes to ~600 MB and half a minute of CPU (found by
#: tests/hostile). A 20,000-file manifest needs about 40,000.
MAX_CONTAINERS: Final = 200_000

#: Arrays and maps in one message the releaser accepts from a peer (its
#: ``Connection`` gets this instead of MAX_CONTAINERS). The releaser never
#: decodes a manifest from the wire; its largest message, a ``report_outcomes``
#: of MAX_OUTCOMES entries, has about 70. A peer's 60,000 small arrays cost
#: ~6 MB of small-object memory and ~30 ms on the event loop while decoded;
#: objects of the releaser allocated meanwhile then pinned CPython's 1 MiB
#: arenas, and the live fuzz campaign left it at 1.35x its start RSS (issue 10).
MAX_SERVER_CONTAINERS: Final = 1024

#: Largest value of an integer field of any message (specs/PROTOCOL.md §7.9):
#: the releaser stores them in SQLite, whose INTEGER is signed 64-bit.
MAX_WIRE_INT: Final = 2**63 - 1

#: Requests one side may have outstanding towards the other at once.
MAX_OUTSTANDING_REQUESTS: Final = 64

#: Chunks one ``get_chunks`` request may ask for.
MAX_CHUNKS_PER_REQUEST: Final = 64

#: Files one manifest may list.
MAX_FILES: Final = 20_000

#: Longest relative path in a manifest, in bytes of UTF-8.
MAX_PATH_LEN: Final = 1024

#: Default heartbeat interval in seconds; the idle deadline is three of them.
DEFAULT_HEARTBEAT: Final = 15.0
IDLE_HEARTBEATS: Final = 3

#: Listings are paginated (issue 10, item 8; specs/PROTOCOL.md §7.7): at most
#: ``limit`` rows per answer, and fewer if the page would grow past the
#: releaser's byte budget. ``after`` is the ``next`` cursor of the previous page
#: (opaque; None for the first page); a ``next`` of None means the last page.
DEFAULT_PAGE: Final = 200
MAX_PAGE: Final = 1000
