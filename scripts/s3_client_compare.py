"""boto3 against obstore as the S3 client of issue 15's object store, measured.

    python scripts/s3_client_compare.py [--gets 200]

Needs moto[server], boto3 and obstore in the running interpreter. Starts a
moto S3-API server in a separate process on 127.0.0.1 (nothing else is
contacted), then for each client prints, as one JSON object per line:

- install_mib: the installed files of the client and of every distribution it
  requires, transitively (what `pip install` of it adds to a bare venv);
- import_ms: median of 5 fresh interpreters doing the import and building a
  client for the endpoint (what a `fleetpush server --store s3://...` start pays);
- get_1mib_p50_ms / p99: latency of a whole 1 MiB GET over real HTTP, sequential.

Stops by itself: every loop is bounded and the moto process is terminated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

# moto accepts any credentials; these are not secrets.
SECRET = "testing"  # noqa: S105
REGION = "us-east-1"
BUCKET = "compare"
KEY = "one-mib"

SERVER = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()
s.stop()
"""

IMPORTS = {
    "boto3": (
        "import boto3\n"
        "c = boto3.client('s3', endpoint_url=URL, region_name='us-east-1',"
        " aws_access_key_id='testing', aws_secret_access_key='testing')\n"
    ),
    "obstore": (
        "from obstore.store import S3Store\n"
        "c = S3Store('compare', endpoint=URL, region='us-east-1',"
        " access_key_id='testing', secret_access_key='testing',"
        " client_options={'allow_http': True})\n"
    ),
}


def closure_bytes(dist_name: str) -> int:
    """Bytes of the installed files of ``dist_name`` and its requirements."""
    seen: set[str] = set()
    todo = [dist_name]
    total = 0
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for f in dist.files or ():
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                total += path.stat().st_size
        for req in dist.requires or ():
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return total


def import_ms(client: str, url: str) -> float:
    times = []
    for _ in range(5):
        code = (
            "import time; t = time.perf_counter()\n"
            f"URL = {url!r}\n" + IMPORTS[client] + "print((time.perf_counter() - t) * 1000)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        times.append(float(out.stdout.strip()))
    return statistics.median(times)


def gets_boto3(url: str, n: int) -> list[float]:
    import boto3

    c: Any = boto3.client(
        "s3", endpoint_url=url, region_name=REGION,
        aws_access_key_id="testing", aws_secret_access_key=SECRET,
    )  # fmt: skip
    c.create_bucket(Bucket=BUCKET)
    c.put_object(Bucket=BUCKET, Key=KEY, Body=os.urandom(1 << 20))
    out = []
    for _ in range(n):
        t = time.perf_counter()
        body = c.get_object(Bucket=BUCKET, Key=KEY)["Body"].read()
        out.append(time.perf_counter() - t)
        assert len(body) == 1 << 20
    return out


def gets_obstore(url: str, n: int) -> list[float]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        BUCKET, endpoint=url, region=REGION, access_key_id="testing",
        secret_access_key=SECRET, client_options={"allow_http": True},
    )  # fmt: skip
    out = []
    for _ in range(n):
        t = time.perf_counter()
        body = obstore.get(store, KEY).bytes()
        out.append(time.perf_counter() - t)
        assert len(body) == 1 << 20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gets", type=int, default=200)
    args = ap.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline())}"
        # boto3 creates the bucket and object, so it goes first.
        for client, gets in (("boto3", gets_boto3), ("obstore", gets_obstore)):
            lat = sorted(gets(url, args.gets))
            print(json.dumps({
                "client": client,
                "version": metadata.version(client),
                "install_mib": round(closure_bytes(client) / (1 << 20), 1),
                "import_ms": round(import_ms(client, url), 1),
                "get_1mib_p50_ms": round(lat[len(lat) // 2] * 1000, 2),
                "get_1mib_p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 2),
            }))  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
