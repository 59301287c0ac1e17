"""The protocol core does no I/O and cannot be made to allocate by a small body."""

from __future__ import annotations

import ast
import subprocess
import sys
import tracemalloc
from pathlib import Path

import fleetpush.protocol
import pytest
from fleetpush.protocol import DecodeError, codec
from fleetpush.protocol.frames import encode_message_frame
from protocol_helpers import ConnectionPair, drain

BOMB = b"\xdc\x27\x10" * 900  # array16 of 10 000, nested 900 deep: 2 700 bytes

FORBIDDEN = {
    "trio",
    "socket",
    "os",
    "time",
    "random",
    "asyncio",
    "selectors",
    "ssl",
    "subprocess",
    "threading",
}


def test_import_does_not_pull_in_io() -> None:
    code = (
        "import sys\n"
        "import fleetpush.protocol\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'outcome', 'sniffio')\n"
        "             or m.startswith(('fleetpush.net', 'fleetpush.server', 'fleetpush.client', "
        "'fleetpush.cli')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_protocol_modules_import_no_io_module() -> None:
    # STYLE.md §1: no trio, socket, os, time or random inside protocol/.
    package = Path(fleetpush.protocol.__file__).parent
    offenders = []
    files = sorted(package.glob("*.py"))
    assert len(files) >= 15
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def _peak(fn: object) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError):
            fn()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_header_bomb_does_not_allocate() -> None:
    assert _peak(lambda: codec.unpackb(BOMB)) < 1_000_000


def test_header_bomb_through_a_connection_does_not_allocate() -> None:
    conn = ConnectionPair().handshake().client
    conn.receive_data(encode_message_frame(BOMB), 0.0)
    assert _peak(lambda: drain(conn)) < 1_000_000


@pytest.mark.parametrize(
    "body",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 G items
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 G pairs
        b"\xc6\x00\x7f\xff\xff",  # bin32 claiming 8 MiB
        b"\xdb\x00\x00\xff\xff",  # str32 claiming 64 KiB (over MAX_STR_LEN once filled)
    ],
    ids=["array32", "map32", "bin32", "str32"],
)
def test_lying_length_prefixes_do_not_allocate(body: bytes) -> None:
    assert _peak(lambda: codec.unpackb(body)) < 1_000_000
