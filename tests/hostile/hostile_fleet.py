"""Real updaters for the hostile network tests (releaser, keys and trees: tests/support).

Also runnable as a script (``python hostile_fleet.py device ARGS``) so a device
can be started inside a network namespace with ``ip netns exec``: it runs a
counting :class:`FaultProxy` in front of the releaser, checks, and stages the
offered release, resuming after every failure, then prints one JSON line with
the proxy's byte counters, the attempts and whether the staged files match.
Run that way, tests/support must be on PYTHONPATH (test_hostile_netns.py sets it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import fp_devices
import trio
from faultproxy import FaultProxy, Faults
from fleetpush.client.config import UpdaterConfig
from fleetpush.client.layout import StateLayout
from fleetpush.client.updater import Updater
from fleetpush.protocol import FleetpushError
from fp_releaser import publish, releaser
from fp_trees import tree_digests

APP = "hostile"


def publish_approved(data_dir: Path, src: Path, version: str, **kw: Any) -> None:
    """Publish ``src`` as ``version`` of APP, approved before any releaser runs."""
    publish(data_dir, src, version, app=APP, approved=True, **kw)


def staged_digests(state_dir: Path, version: str) -> dict[str, str]:
    return tree_digests(StateLayout.of(state_dir).staged_files(version))


def device_config(root: Path, server: str, device_id: str, **kw: Any) -> UpdaterConfig:
    """A device of APP that resumes patiently: slow back-off, many download attempts."""
    settings: dict[str, Any] = dict(
        app=APP,
        version="1.0.0",
        device_id=device_id,
        backoff_initial=0.2,
        backoff_max=1.0,
        check_timeout=10.0,
        max_download_attempts=1000,
    )
    settings.update(kw)
    return fp_devices.device_config(root, server, **settings)


async def stage_with_resume(updater: Updater, deadline: float) -> dict[str, Any]:
    """Check, then stage the offered release, retrying every failure until it is staged."""
    attempts = 0
    errors: list[str] = []
    started = time.monotonic()
    with trio.fail_after(deadline):
        while True:
            attempts += 1
            try:
                info = await updater.check()
                assert info.verified is not None, info
                await updater.stage(info.verified)
            except FleetpushError as e:
                errors.append(f"{type(e).__name__}: {e}")
                await trio.sleep(0.3)
                continue
            break
    return {
        "attempts": attempts,
        "errors": errors[-5:],
        "version": info.verified.manifest.version,
        "elapsed": time.monotonic() - started,
    }


async def device_main(args: argparse.Namespace) -> dict[str, Any]:
    config = device_config(Path(args.root), f"{args.host}:{args.port}", args.device_id)
    updater = Updater(config)
    async with updater.connected():
        result = await stage_with_resume(updater, args.deadline)
    result["staged"] = staged_digests(Path(args.root) / "state", result["version"])
    return result


async def releaser_main(args: argparse.Namespace) -> dict[str, Any]:
    """The releaser on 127.0.0.1 behind a counting proxy on ``--host`` (inside a namespace).

    Prints ``{"port": N}`` once listening; prints the proxy's counters and
    exits when stdin closes.
    """
    timeouts = {"send_timeout": args.send_timeout, "frame_timeout": args.frame_timeout}
    async with releaser(Path(args.data_dir), **timeouts) as handle, trio.open_nursery() as nursery:
        # A short queue: the proxy only counts, it must not add buffering of its own.
        proxy = FaultProxy(handle.port, Faults(queue=2), listen_host=args.host)
        await nursery.start(proxy.run)
        print(json.dumps({"port": proxy.port}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()
    return {
        "bytes_down": proxy.bytes_down,
        "bytes_up": proxy.bytes_up,
        "connections": proxy.connections,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["device", "releaser"])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--root", help="device: its directory")
    ap.add_argument("--data-dir", help="releaser: its data dir")
    ap.add_argument("--device-id", default="netns-dev")
    ap.add_argument("--deadline", type=float, default=120.0)
    ap.add_argument("--send-timeout", type=float, default=30.0)
    ap.add_argument("--frame-timeout", type=float, default=30.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = trio.run(device_main if args.role == "device" else releaser_main, args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
