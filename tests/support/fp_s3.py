"""A real S3-API endpoint for the tests (issue 15, S3-compatible object store).

No S3 server is packaged in Debian, so the endpoint is moto's
``ThreadedMotoServer``: a real HTTP server on 127.0.0.1 (port 0) speaking the
S3 REST protocol, which the store's client reaches exactly as it would reach
any other endpoint URL. Fixtures, registered for every test by tests/conftest.py:

- ``s3_server`` (session): the endpoint URL, started once per run.
- ``s3_bucket`` (function): a new, empty bucket on it for one test, with the
  credentials and region to use (:class:`S3Bucket`; ``env()`` for a subprocess).

A test using either is marked ``s3`` automatically. Without moto installed
they are skipped, or fail under ``FLEETPUSH_REQUIRE_SERVICES=1`` (fp_services.py).
Buckets are made with boto3 (moto requires it); the product's client is obstore.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from fp_services import service_unavailable

# moto accepts any credentials; fixed ones keep a test from ever finding a
# developer's real ~/.aws ones through the default credential chain.
ACCESS_KEY = "fleetpush-test"
SECRET_KEY = "fleetpush-test-secret"
REGION = "us-east-1"


@attrs.frozen(kw_only=True)
class S3Bucket:
    """One test's bucket on the run's S3 endpoint."""

    endpoint_url: str
    name: str
    region: str = REGION
    access_key_id: str = ACCESS_KEY
    secret_access_key: str = SECRET_KEY

    def url(self, prefix: str = "") -> str:
        """The ``s3://bucket/prefix`` form of ``fleetpush server --store``."""
        return f"s3://{self.name}/{prefix}" if prefix else f"s3://{self.name}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables naming this endpoint and its credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            # The test endpoint is plain HTTP on loopback (obstore refuses
            # http:// unless told).
            "AWS_ALLOW_HTTP": "true",
        }


class S3Unavailable(Exception):
    """The S3 test endpoint cannot be run here; the message says why."""


@contextlib.contextmanager
def running_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the block; yields its endpoint URL.

    Raises S3Unavailable.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        hint = "[pip install -e '.[test]']"
        raise S3Unavailable(f"moto's server cannot be imported ({e}) {hint}") from e
    # One line per request on stderr would bury a failing test's output.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
    except OSError as e:
        raise S3Unavailable(f"moto server did not start: {e}") from e
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _boto3_client(endpoint_url: str) -> Any:
    try:
        import boto3
    except ImportError as e:
        raise S3Unavailable("boto3 is not installed [pip install -e '.[test]']") from e
    return boto3.client(
        "s3", endpoint_url=endpoint_url, region_name=REGION,
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    )  # fmt: skip


_bucket_numbers = itertools.count(1)


@contextlib.contextmanager
def fresh_bucket(endpoint_url: str) -> Iterator[S3Bucket]:
    """A new empty bucket for the block; emptied and deleted afterwards."""
    client = _boto3_client(endpoint_url)
    name = f"fp-{os.getpid()}-{next(_bucket_numbers)}"
    client.create_bucket(Bucket=name)
    try:
        yield S3Bucket(endpoint_url=endpoint_url, name=name)
    finally:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            for obj in page.get("Contents", ()):
                client.delete_object(Bucket=name, Key=obj["Key"])
        client.delete_bucket(Bucket=name)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the endpoint ``s3`` (before ``-m`` selects)."""
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The run's S3 endpoint URL (``http://127.0.0.1:<port>``)."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(running_s3())
        except S3Unavailable as e:
            service_unavailable("S3 endpoint", str(e))
        yield url


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[S3Bucket]:
    """A fresh empty bucket on the run's S3 endpoint."""
    with contextlib.ExitStack() as stack:
        try:
            bucket = stack.enter_context(fresh_bucket(s3_server))
        except S3Unavailable as e:
            service_unavailable("S3 endpoint", str(e))
        yield bucket
