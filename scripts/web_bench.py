"""How fast the web dashboard answers on a big fleet, and how soon a change reaches a page.

Fills a fresh data dir like scripts/fleet_views_bench.py (``--devices``
accepted devices, default 10,000; ``--events`` stored events, default
1,000,000; a push per 10 devices; a finished deployment over all of them),
starts a real releaser with the dashboard on 127.0.0.1, signs in, and loads
each page ``--rounds`` times (default 20) over real HTTP: the median, min and
max of the server's own time (the ``Server-Timing`` header) and of the whole
request as the client saw it, in milliseconds. Target: 100 ms each.

Then, unless ``--no-browser``: a real device connects, a headless chromium
(tests/support/fp_browser.py) opens its page, and the device reports a new
update state ``--changes`` times (default 10); the latency from the report
leaving the device to the page's DOM showing it (a MutationObserver in the
page stamps the time). Target: 1 s.

    python scripts/web_bench.py [--devices N] [--events N] [--rounds N] [--no-browser] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import secrets
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import PROTOCOL_VERSION
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Hello, UpdateProgress
from fleetpush.server import ServerConfig, publish_release, serve
from fleetpush.server.web.login import make_token

from fleetpush.net.dial import dial

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "support"))
from fleet_views_bench import fill  # noqa: E402

TARGET_MS = 100
PAGES = {
    "fleet": "/",
    "devices": "/devices",
    "devices state=failed": "/devices?state=failed",
    "devices version=1.2.0 group=site-6": "/devices?version=1.2.0&group=site-6",
    "devices search dev-077": "/devices?q=dev-077",
    "devices connected=yes": "/devices?connected=yes",
    "devices page 100": "/devices?after=dev-05000",
    "devices sort=last_seen": "/devices?sort=last_seen",
    "devices sort=version page 150": "/devices?sort=version&offset=7500",
    "devices sort=state state=trial": "/devices?sort=state&state=trial&offset=1000",
    "device": "/devices/{middle}",
    "releases": "/releases",
    "deployments": "/deployments",
    "deployment dep-1": "/deployments/dep-1",
}


def get(base: str, path: str, cookie: str) -> tuple[int, float, float]:
    """(status, server ms, client ms) of one GET."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    t = time.perf_counter()
    conn.request("GET", path, headers={"cookie": f"fp_session={cookie}"})
    resp = conn.getresponse()
    resp.read()
    client = (time.perf_counter() - t) * 1000
    conn.close()
    m = re.search(r"dur=([0-9.]+)", resp.getheader("server-timing") or "")
    return resp.status, float(m.group(1)) if m else -1.0, client


def sign_in(base: str, key: Ed25519PrivateKey) -> str:
    token = make_token(key, "bench", now=time.time(), nonce=secrets.token_bytes(16))
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/login", body=f"token={token}",
                 headers={"content-type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    m = re.match(r"fp_session=([^;]+)", resp.getheader("set-cookie") or "")
    conn.close()
    assert m, "sign-in failed"
    return m.group(1)


def stats(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values), 2), "min_ms": round(min(values), 2),
            "max_ms": round(max(values), 2)}


def pages(base: str, cookie: str, rounds: int, devices: int) -> dict[str, Any]:
    out = {}
    for name, template in PAGES.items():
        path = template.replace("{middle}", f"dev-{devices // 2:05d}")
        server, client = [], []
        for _ in range(rounds):
            status, s, c = get(base, path, cookie)
            assert status == 200, (name, status)
            server.append(s)
            client.append(c)
        out[name] = {"server": stats(server), "client": stats(client)}
    return out


OBSERVE = """
window.seen = {};
new MutationObserver(() => {
  const dd = document.querySelector('dd[data-fact="state"]');
  if (dd && !(dd.innerText in window.seen)) window.seen[dd.innerText] = Date.now();
}).observe(document.getElementById('main'), {childList: true, subtree: true});
true
"""


async def dom_latency(base: str, port: int, key: Ed25519PrivateKey, changes: int,
                      tmp: Path) -> dict[str, Any]:
    from fp_browser import find_chromium, running_chromium

    exe = find_chromium()
    if exe is None:
        return {"skipped": "no chromium (apt-get install -y chromium)"}
    dev_key = Ed25519PrivateKey.generate()
    hello = Hello(protocol_version=PROTOCOL_VERSION, role="device", peer_id="bench-dev",
                  public_key=public_bytes(dev_key), app="sensor", version="1.0.0",
                  channel="stable")
    token = make_token(key, "bench", now=time.time(), nonce=secrets.token_bytes(16))
    latencies = []
    async with dial(("127.0.0.1", port), dev_key, hello, timeout=20) as link:
        with running_chromium(exe) as browser:
            page = browser.new_page(tmp)
            try:
                await trio.to_thread.run_sync(page.goto, f"{base}/login?token={token}")
                await trio.to_thread.run_sync(
                    partial(page.click, "#sign-in", wait_load=True)
                )
                await trio.to_thread.run_sync(page.goto, f"{base}/devices/bench-dev")
                await trio.to_thread.run_sync(
                    page.wait_for, "document.body.dataset.liveOpen === '1'", 10
                )
                await trio.to_thread.run_sync(page.eval, OBSERVE)
                states = ("downloading", "verifying", "staged", "idle", "checking")
                for i in range(changes):
                    state = states[i % len(states)]
                    await trio.to_thread.run_sync(page.eval, "window.seen = {}; true")
                    sent = time.time() * 1000
                    await link.peer.notify(
                        "update_progress", UpdateProgress(state=state, app="sensor",
                                                          version="1.0.0"),
                    )
                    with trio.fail_after(10):
                        while True:
                            seen = await trio.to_thread.run_sync(
                                page.eval, f"window.seen[{json.dumps(state)}] || 0"
                            )
                            if seen:
                                break
                            await trio.sleep(0.02)
                    latencies.append(seen - sent)
                    await trio.sleep(0.3)
            finally:
                page.close()
    return {"changes": changes, **stats(latencies), "target_ms": 1000}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fp-web-") as tmp:
        data_dir = Path(tmp) / "data"
        filled = fill(data_dir, args.devices, args.events)
        key = Ed25519PrivateKey.generate()
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "app.bin").write_bytes(bytes(range(256)) * 64)
        for version in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
            publish_release(data_dir, src, app="sensor", version=version, signing_keys=[key],
                            notes=f"sensor {version}")
        config = ServerConfig(
            data_dir=data_dir, port=0, operator_keys=[public_bytes(key)],
            history_limit=max(args.events * 2, 100), grace_period=1.0, http="127.0.0.1:0",
        )
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve, config)
            base = handle.http_url
            cookie = await trio.to_thread.run_sync(sign_in, base, key)
            results = await trio.to_thread.run_sync(pages, base, cookie, args.rounds, args.devices)
            latency = None
            if not args.no_browser:
                latency = await dom_latency(base, handle.port, key, args.changes, Path(tmp))
            await handle.shutdown()
    return {"devices": args.devices, "events": args.events, "rounds": args.rounds,
            "fill_seconds": round(filled, 1), "target_ms": TARGET_MS, "pages": results,
            "state_change_to_dom": latency}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--changes", type=int, default=10)
    p.add_argument("--no-browser", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = trio.run(run, args)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['devices']} devices, {out['events']} events (filled in {out['fill_seconds']} s),"
          f" {out['rounds']} loads a page; target {TARGET_MS} ms server time")
    for name, r in out["pages"].items():
        s, c = r["server"], r["client"]
        print(f"  {name:<36} server median {s['median_ms']:7.2f} ms (max {s['max_ms']:.2f})"
              f"  client median {c['median_ms']:7.2f} ms")
    lat = out["state_change_to_dom"]
    if lat is not None:
        if "skipped" in lat:
            print(f"  state change -> DOM: skipped: {lat['skipped']}")
        else:
            print(f"  state change -> DOM ({lat['changes']} changes): median {lat['median_ms']:.0f}"
                  f" ms, min {lat['min_ms']:.0f}, max {lat['max_ms']:.0f}; target 1000 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
