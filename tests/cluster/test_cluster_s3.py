"""Two releasers with their own data dirs serve a release published once to S3 (issue 15).

A release published with ``--store s3://...`` into A's data dir has its rows
in the shared PostgreSQL and its files in the bucket (moto's S3 server,
tests/support/fp_s3.py), so B, whose data dir never saw it, serves it: a
push made through A installs on a real agent connected to B.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cluster_helpers import two_releasers, until
from fleetpush.server.artifacts import S3Store
from fp_agent import AgentDevice
from fp_releaser import approve, publish, push
from fp_s3 import S3Bucket
from fp_trees import app_release


async def test_a_release_in_s3_published_through_a_installs_from_b(
    tmp_path: Path, pg_url: str, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_bucket.env().items():
        monkeypatch.setenv(name, value)
    url = s3_bucket.url("fleet")
    data_a, data_b = tmp_path / "a", tmp_path / "b"
    with trio.fail_after(120):
        async with two_releasers(data_a, pg_url, data_b=data_b, store=url) as (a, b):
            dev = AgentDevice(tmp_path / "d1", b.port, device_id="d1")
            await dev.start_agent()
            try:
                await dev.wait_owner()
                await until(lambda: "d1" in b.services.fleet)
                src = app_release(tmp_path, "plain_app", "2.0.0")
                await trio.to_thread.run_sync(
                    lambda: publish(data_a, src, "2.0.0", store=S3Store(url))
                )
                await approve(a, "2.0.0")
                await push(a, "2.0.0", devices=["d1"])
                await until(lambda: dev.status.read_text().split()[1] == "2.0.0", timeout=60)
            finally:
                await dev.stop_agents()
    assert not (data_b / "releases").exists() or not any((data_b / "releases").iterdir())
