"""Prometheus metrics (issue 13, part 4): a real releaser with ``metrics`` set is
scraped over HTTP(S) on 127.0.0.1 before and after a real device downloads a
release, and the counters and gauges it documents move."""

from __future__ import annotations

import re
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import trio
from fleetpush.client.updater import Updater
from fleetpush.protocol import FleetpushError
from fp_devices import device_config
from fp_releaser import publish_and_approve, releaser
from fp_trees import make_release_dir

from fleetpush.operator import connect as operator_connect

pytestmark = pytest.mark.slow
RELEASE_BYTES = 300_000


def scrape(url: str) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the releaser's own self-signed certificate
    with urllib.request.urlopen(url, timeout=10, context=context) as r:
        assert r.status == 200
        body: bytes = r.read()
    return body.decode()


def value(text: str, name: str, labels: str = "") -> float:
    """The sample ``name{labels}`` of an exposition, 0 when absent."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)\n"
    found = re.search("^" + pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_counters_and_gauges_move_during_a_real_update(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with releaser(
            tmp_path / "data", metrics="127.0.0.1:0", metrics_interval=0.1
        ) as handle:
            assert handle.metrics_url is not None
            assert handle.metrics_url.startswith("http://127.0.0.1:")  # plain TCP releaser
            before = await trio.to_thread.run_sync(scrape, handle.metrics_url)
            assert value(before, "fleetpush_chunk_bytes_served_total") == 0
            assert value(before, "process_resident_memory_bytes") > 0

            src = make_release_dir(tmp_path / "rel-2.0", RELEASE_BYTES)
            await publish_and_approve(handle, tmp_path / "data", src, "2.0")
            updater = Updater(device_config(tmp_path / "device", handle.port))
            async with updater.connected():
                info = await updater.check()
                assert info.available and info.verified is not None
                await updater.stage(info.verified)
                await trio.sleep(0.3)  # two refreshes of the gauges
                during = await trio.to_thread.run_sync(scrape, handle.metrics_url)

            # A stranger's key is refused during the handshake: counted by reason.
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            with pytest.raises(FleetpushError, match="unknown operator key"):
                async with operator_connect(
                    ("127.0.0.1", handle.port), Ed25519PrivateKey.generate(), name="x"
                ):
                    pass
            after = await trio.to_thread.run_sync(scrape, handle.metrics_url)

    assert value(during, "fleetpush_chunk_bytes_served_total") >= RELEASE_BYTES
    assert value(during, "fleetpush_chunks_served_total") >= 1
    assert value(during, "fleetpush_request_duration_seconds_count", 'method="get_chunks"') >= 1
    assert value(during, "fleetpush_request_duration_seconds_count", 'method="check_update"') == 1
    assert value(during, "fleetpush_connected_devices") == 1
    assert value(during, "fleetpush_devices_by_version", 'version="1.0"') == 1
    assert value(during, "fleetpush_devices_by_state", 'state="staged"') == 1
    assert value(after, "fleetpush_handshake_failures_total", 'reason="AUTH_FAILED"') == 1
    assert value(before, "fleetpush_handshake_failures_total", 'reason="AUTH_FAILED"') == 0


def test_cli_serves_metrics_over_tls_and_refuses_a_bad_address(tmp_path: Path) -> None:
    cmd = [sys.executable, "-P", "-m", "fleetpush.cli.main", "server"]
    proc = subprocess.Popen(
        [*cmd, "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
         "--metrics", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        url = None
        for _ in range(20):
            line = proc.stdout.readline()
            if line.startswith("metrics on "):
                url = line.split()[-1]
            if line.startswith("listening on") or not line:
                break
        assert url is not None and url.startswith("https://127.0.0.1:"), url
        text = scrape(url)
        assert "# TYPE fleetpush_chunk_bytes_served_total counter" in text
        assert value(text, "fleetpush_connected_devices") == 0
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()

    bad = subprocess.run(
        [*cmd, "--data-dir", str(tmp_path / "d2"), "--listen", "127.0.0.1:0",
         "--metrics", "127.0.0.1:notaport"],
        capture_output=True, text=True, timeout=30,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("fleetpush server: metrics: "), bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
