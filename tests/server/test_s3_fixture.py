"""The S3 test fixtures (tests/support/fp_s3.py) against a real S3-API endpoint.

The object store of issue 15 will use obstore (pyproject's ``s3`` extra),
configured only by an endpoint URL, a bucket and credentials: these tests
drive exactly that client over real HTTP to moto's server on loopback, so the
store's tests later run on ground known to work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from fp_s3 import S3Bucket


def store_for(bucket: S3Bucket) -> Any:
    # Imported here: the s3_bucket fixture has already checked moto (and so the
    # test extra) is installed, or skipped.
    from obstore.store import S3Store

    return S3Store(
        bucket.name, endpoint=bucket.endpoint_url, region=bucket.region,
        access_key_id=bucket.access_key_id, secret_access_key=bucket.secret_access_key,
        client_options={"allow_http": True, "timeout": "10s"},
    )  # fmt: skip


def test_put_get_list_round_trip_over_http(s3_bucket: S3Bucket) -> None:
    import obstore

    store = store_for(s3_bucket)
    blob = os.urandom(1 << 20)
    obstore.put(store, "releases/app/1.0/chunk-0", blob)
    obstore.put(store, "releases/app/1.0/chunk-1", b"tail")
    obstore.put(store, "other/file", b"x")
    assert bytes(obstore.get(store, "releases/app/1.0/chunk-0").bytes()) == blob
    listed = [m["path"] for batch in obstore.list(store, prefix="releases/") for m in batch]
    assert sorted(listed) == ["releases/app/1.0/chunk-0", "releases/app/1.0/chunk-1"]
    ranged = obstore.get_range(store, "releases/app/1.0/chunk-0", start=10, end=20)
    assert bytes(ranged) == blob[10:20]


def test_a_missing_object_is_a_file_not_found_error(s3_bucket: S3Bucket) -> None:
    # obstore 0.12 raises the builtin FileNotFoundError here, not its own
    # NotFoundError (which is no subclass of it): the store must catch this one.
    import obstore

    with pytest.raises(FileNotFoundError, match="NoSuchKey"):
        obstore.get(store_for(s3_bucket), "no/such/key").bytes()


def test_each_test_gets_its_own_empty_bucket(s3_server: str, s3_bucket: S3Bucket) -> None:
    import obstore

    assert s3_bucket.endpoint_url == s3_server
    assert s3_server.startswith("http://127.0.0.1:")
    assert s3_bucket.url("releases") == f"s3://{s3_bucket.name}/releases"
    # The previous test's objects are in its own (now deleted) bucket.
    assert [m for batch in obstore.list(store_for(s3_bucket)) for m in batch] == []


def test_a_subprocess_reaches_the_bucket_from_the_environment_alone(
    s3_bucket: S3Bucket,
) -> None:
    # `fleetpush server --store s3://...` in a subprocess test will be given
    # nothing but these variables: the endpoint must come from them.
    code = textwrap.dedent("""
        import sys, obstore
        from obstore.store import S3Store
        store = S3Store(sys.argv[1])
        obstore.put(store, "from-env", b"hello")
        print(bytes(obstore.get(store, "from-env").bytes()).decode())
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_bucket.env())
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code, s3_bucket.name],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello"
    import obstore

    assert bytes(obstore.get(store_for(s3_bucket), "from-env").bytes()) == b"hello"
