"""Peer delivery on a LAN of real processes, measured (issue 18; root, ip netns, bridge).

    sudo python scripts/p2p_lan.py --devices 50 --size 64MiB --json

Builds the LAN of tests/netns/lan.py: a real ``fleetpush server`` in a hub
namespace holding a Linux bridge, and ``--devices`` real ``fleetpush agent``
processes (``p2p = true``), one namespace each, on that bridge. Two of them
are hostile: ``liar`` serves release files overwritten on disk after it
installed them, ``mute`` announces a p2p address where a listener accepts and
never answers. Both get the release in a first deployment; the measured
deployment rolls it out to every other device in doubling phases. Printed:
the releaser's chunk egress for that deployment (``fleetpush_chunk_bytes_served``
delta) and its ratio to the release size, its wire egress (the bridge's tx bytes, headers included),
the bytes devices report from peers vs the releaser (``p2p_delivery``
events), the liar's reports, and the time until every device installed.
Not a test: nothing asserted here (tests/netns/test_p2p_lan.py asserts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "netns"))

import lan


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, mult in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=50, help="devices on the LAN, 2 hostile (50)")
    p.add_argument("--size", type=parse_size, default=parse_size("64MiB"), help="release size")
    p.add_argument("--chunk", type=parse_size, default=parse_size("1MiB"), help="chunk size")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per deployment")
    p.add_argument("--keep", type=Path, help="keep the workspace (logs, trees) here")
    p.add_argument("--json", action="store_true", help="one JSON object")
    args = p.parse_args()
    if args.devices < 4:
        p.error("--devices must be at least 4 (2 hostile, 2 honest)")
    reason = lan.unavailable()
    if reason is not None:
        print(f"fleetpush: p2p_lan: cannot build the LAN: {reason}", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="p2p-lan-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = lan.run(work, args.devices, args.size, args.chunk, args.timeout)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    for k in ("deploy_show", "deploy_show_text", "devices_view", "src", "work"):
        result.pop(k, None)
    if args.json:
        print(json.dumps(result))
        return 0
    for k, v in result.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
