"""Issue 10, item 9: a device reads only the releases of the app its hello names.

Under auto-enrolment any stranger is a device; one announcing ``app = nil``
used to fetch every approved release of every app. A real releaser on
loopback, devices through the real handshake.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from fleetpush.protocol import ErrorCode, RpcError
from fleetpush.protocol.messages import CheckUpdate, GetChunks, GetManifest
from fleetpush.server import ServerConfig
from fp_releaser import approve_in_store, running_releaser
from server_helpers import connect, publish

READS = {
    "check_update": CheckUpdate(app="secret", version="0.1"),
    "get_manifest": GetManifest(app="secret", version="1.0"),
    "get_chunks": GetChunks(app="secret", version="1.0", chunks=[(0, 0)]),
}


@pytest.mark.parametrize("method", sorted(READS))
@pytest.mark.parametrize("announced", [None, "demo"], ids=["app nil", "another app"])
async def test_a_device_reads_no_release_of_another_app(
    config: ServerConfig, data_dir: Path, tmp_path: Path, method: str, announced: str | None
) -> None:
    publish(data_dir, tmp_path, "1.0", app="secret")
    approve_in_store(data_dir, "1.0", app="secret")
    with trio.fail_after(20):
        async with running_releaser(config) as server:
            async with connect(server.port, app=announced, peer_id="stranger") as dev:
                with pytest.raises(RpcError) as e:
                    await dev.request(method, READS[method])
                assert e.value.code == ErrorCode.FORBIDDEN, e.value
            # The app's own devices still get it.
            async with connect(server.port, app="secret", peer_id="owner") as dev:
                offer = await dev.request("check_update", CheckUpdate(app="secret", version="0.1"))
                assert offer.available and offer.version == "1.0"
                files = await dev.download("secret", "1.0")
                assert files
