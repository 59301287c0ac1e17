"""The operator commands, run as the real `fleetpush` script against a real releaser."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import FLEETPUSH, Releaser, run_cli

from fleetpush.cli.exitcodes import EXIT_AUTH, EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_USAGE


def publish(r: Releaser, tmp_path: Path, version: str, app: str = "sensor") -> dict[str, object]:
    src = tmp_path / f"src-{app}-{version}"
    src.mkdir()
    (src / "main.py").write_text(f"print('{version}')\n")
    out = run_cli(
        "release",
        "publish",
        str(src),
        "--app",
        app,
        "--version",
        version,
        "--notes",
        f"notes {version}",
        "--config",
        str(r.config),
        "--json",
    )
    assert out.code == 0, out.err
    doc: dict[str, object] = json.loads(out.out)
    return doc


def cli(r: Releaser, *args: str) -> tuple[int, str, str]:
    res = run_cli(*args, "--config", str(r.config))
    return res.code, res.out, res.err


@pytest.fixture
def devices(releaser: Releaser, tmp_path: Path) -> Iterator[list[str]]:
    """Three device sessions of app 'sensor' held open by a bench fleet worker."""
    host, port = releaser.address.split(":")
    job = tmp_path / "fleet.json"
    job.write_text(
        json.dumps(
            {
                "host": host,
                "port": int(port),
                "devices": 3,
                "app": "sensor",
                "prefix": "dev",
                "workdir": str(tmp_path / "fleet"),
                "release_key": releaser.release_pub,
                "tls_pin": releaser.tls_pin,
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetpush.bench.fleet", str(job)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"ready": 3}
        yield ["dev-0000", "dev-0001", "dev-0002"]
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_publish_list_promote_revoke(releaser: Releaser, tmp_path: Path) -> None:
    doc = publish(releaser, tmp_path, "1.0.0")
    assert doc["version"] == "1.0.0" and doc["status"] == "draft" and doc["sequence"] == 1
    publish(releaser, tmp_path, "1.1")
    code, out, _ = cli(releaser, "release", "list", "--json")
    assert code == 0
    releases = json.loads(out)
    assert [(x["version"], x["status"]) for x in releases] == [("1.0.0", "draft"), ("1.1", "draft")]
    code, out, _ = cli(releaser, "release", "list")
    assert "1.0.0" in out and "draft" in out and "notes 1.1" in out

    code, _, err = cli(releaser, "release", "promote", "sensor", "1.0.0", "approved")
    assert code == EXIT_CONFLICT, err
    assert "draft" in err
    assert cli(releaser, "release", "promote", "sensor", "1.0.0", "pre-released")[0] == 0
    code, out, _ = cli(releaser, "release", "promote", "sensor", "1.0.0", "approved", "--json")
    assert code == 0 and json.loads(out)["status"] == "approved"
    code, out, _ = cli(releaser, "release", "revoke", "sensor", "1.0.0")
    assert code == 0 and "revoked" in out
    code, _, err = cli(releaser, "release", "promote", "sensor", "1.0.0", "approved")
    assert code == EXIT_CONFLICT
    code, _, err = cli(releaser, "release", "revoke", "sensor", "9.9")
    assert code == EXIT_NOT_FOUND, err
    code, out, _ = cli(releaser, "release", "list", "--app", "other", "--json")
    assert json.loads(out) == []


def test_publish_refuses_a_taken_version_and_bad_args(releaser: Releaser, tmp_path: Path) -> None:
    publish(releaser, tmp_path, "2.0")
    src = tmp_path / "again"
    src.mkdir()
    (src / "f").write_text("x")
    code, _, err = cli(
        releaser, "release", "publish", str(src), "--app", "sensor", "--version", "2.0"
    )
    assert code == EXIT_CONFLICT, err
    code, _, err = cli(
        releaser,
        "release",
        "publish",
        str(tmp_path / "nope"),
        "--app",
        "sensor",
        "--version",
        "3.0",
    )
    assert code == EXIT_USAGE
    code, _, err = cli(
        releaser, "release", "publish", str(src), "--app", "sensor", "--version", "not a version"
    )
    assert code == EXIT_USAGE, err


def test_wrong_operator_key_is_refused(releaser: Releaser, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    assert run_cli("keygen", "--out", str(other)).code == 0
    code, _, err = cli(releaser, "devices", "--operator-key", str(other))
    assert code == EXIT_AUTH
    assert "operator key" in err


def test_devices_listing_and_push(releaser: Releaser, tmp_path: Path, devices: list[str]) -> None:
    code, out, _ = cli(releaser, "devices", "--json")
    assert code == 0
    listed = {d["device_id"]: d for d in json.loads(out)}
    assert set(listed) == set(devices)
    assert all(d["connected"] and d["app"] == "sensor" for d in listed.values())
    code, out, _ = cli(releaser, "devices", "--app", "sensor")
    assert all(d in out for d in devices) and "CONNECTED" in out
    code, out, _ = cli(releaser, "devices", "--app", "nothing", "--json")
    assert json.loads(out) == []

    publish(releaser, tmp_path, "1.0.0")
    code, _, err = cli(releaser, "push", "--version", "1.0.0", "--all", "--app", "sensor")
    assert code == EXIT_CONFLICT, err  # a draft is never pushed
    cli(releaser, "release", "promote", "sensor", "1.0.0", "pre-released")
    code, out, err = cli(releaser, "push", "--version", "1.0.0", "--device", devices[0], "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["targets"] == [devices[0]] and doc["sent"] == [devices[0]]
    code, out, err = cli(
        releaser, "push", "--version", "1.0.0", "--all", "--app", "sensor", "--no-restart"
    )
    assert code == 0, err
    assert "3 target(s), 3 sent now" in out
    code, out, err = cli(
        releaser, "push", "--version", "1.0.0", "--all", "--app", "sensor", "--stage"
    )
    assert code == 0 and "staged" in out, err
    code, _, err = cli(releaser, "push", "--version", "1.0.0", "--device", "ghost")
    assert code == EXIT_NOT_FOUND, err
    code, _, err = cli(releaser, "push", "--version", "7.0", "--all", "--app", "sensor")
    assert code == EXIT_NOT_FOUND, err
    code, _, err = cli(releaser, "push", "--version", "1.0.0", "--all")
    assert code == EXIT_USAGE


def test_devices_accept_reject_unknown(releaser: Releaser) -> None:
    code, _, err = cli(releaser, "devices", "accept", "ghost")
    assert code == EXIT_NOT_FOUND, err


def test_watch_prints_plain_lines_when_not_a_terminal(releaser: Releaser, tmp_path: Path) -> None:
    publish(releaser, tmp_path, "1.0.0")
    with subprocess.Popen(
        [FLEETPUSH, "watch", "--config", str(releaser.config), "--for", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as watch:
        try:
            time.sleep(2.0)  # let it subscribe
            assert cli(releaser, "release", "promote", "sensor", "1.0.0", "pre-released")[0] == 0
            assert watch.stdout is not None
            line = watch.stdout.readline()
            assert "release_status" in line, line
            assert "pre-released" in line
        finally:
            watch.send_signal(signal.SIGINT)  # Ctrl-C leaves cleanly
            code = watch.wait(10)
        assert code == 0, watch.stderr.read() if watch.stderr else ""


def test_watch_json_lines_replay_history(releaser: Releaser, tmp_path: Path) -> None:
    publish(releaser, tmp_path, "1.0.0")
    assert cli(releaser, "release", "promote", "sensor", "1.0.0", "pre-released")[0] == 0
    res = run_cli(
        "watch", "--config", str(releaser.config), "--json", "--history", "10", "--for", "2"
    )
    assert res.code == 0, res.err
    events = [
        json.loads(block)
        for block in res.out.split("\n}\n")
        if block.strip()
        for block in [block if block.rstrip().endswith("}") else block + "}"]
    ]
    assert any(e["kind"] == "release_status" for e in events)


def test_publish_with_schema_claims_signs_them_into_the_manifest(
    releaser: Releaser, tmp_path: Path
) -> None:
    """`release publish --schema-version N --min-schema M` (issue 12, PROTOCOL.md §7.3.2)."""
    from fleetpush.protocol.manifest import Manifest
    from fleetpush.server.releases import ReleaseStore

    src = tmp_path / "src"
    src.mkdir()
    (src / "main.py").write_text("print('3')\n")
    base = ("release", "publish", str(src), "--app", "sensor", "--config", str(releaser.config))
    out = run_cli(*base, "--version", "3.0", "--schema-version", "4", "--min-schema", "2")
    assert out.code == 0, out.err
    assert out.out.strip().endswith("data schema 4 (migrates from 2)")
    bad = run_cli(*base, "--version", "3.1", "--min-schema", "2")
    assert (bad.code, bad.err.strip()) == (
        EXIT_USAGE,
        "fleetpush: --min-schema needs --schema-version",
    )
    store = ReleaseStore.open(releaser.data_dir)
    try:
        m = Manifest.from_bytes(store.get("sensor", "3.0").signed.signed)
    finally:
        store.close()
    assert (m.schema_version, m.min_schema) == (4, 2)
    # release list shows them, read back from the signed manifest.
    listing = ("release", "list", "--app", "sensor", "--config", str(releaser.config))
    listed = run_cli(*listing, "--json")
    assert listed.code == 0, listed.err
    (row,) = json.loads(listed.out)
    assert (row["schema_version"], row["min_schema"]) == (4, 2)
    table = run_cli(*listing)
    assert "SCHEMA" in table.out and "4 (from 2)" in table.out
