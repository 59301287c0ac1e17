"""The key ceremony through the real `fleetpush` script (README.md, "Root of trust").

init -> sign -> publish root v1; provision a device with it; rotate the
release key with root v2 (signed by the old and the new root key); the
device walks to v2 by itself and trusts the release signed by the new key.
Every refusal is one line with the README's exit code.
"""

from __future__ import annotations

import json
from pathlib import Path

from cli_helpers import Releaser, run_cli
from fleetpush.protocol.root import Root, envelope_from_json
from fp_devices import write_agent_toml
from fp_trees import make_tree

from fleetpush.cli.exitcodes import EXIT_CONFLICT, EXIT_OK, EXIT_USAGE


def ok(*args: str) -> str:
    r = run_cli(*args)
    assert r.code == EXIT_OK, r
    return r.out


def refused(code: int, *args: str) -> str:
    r = run_cli(*args)
    assert r.code == code, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleetpush: root "), r.err
    return lines[0]


def test_key_ceremony_init_sign_publish_rotate(releaser: Releaser, tmp_path: Path) -> None:
    cfg = str(releaser.config)
    keys = tmp_path / "keys"
    for name in ("root1", "root2", "release2"):
        ok("keygen", "--out", str(keys / f"{name}.key"))
    r1 = tmp_path / "root-1.json"
    ok(
        "root",
        "init",
        "--root-key",
        f"{keys}/root1.key.pub",
        "--release-key",
        f"{releaser.release_key}.pub",
        "--out",
        str(r1),
    )
    # Unsigned, it cannot be published.
    assert "carries no signatures" in refused(
        EXIT_USAGE, "root", "publish", str(r1), "--config", cfg
    )
    ok("root", "sign", str(r1), "--key", f"{keys}/root1.key")
    shown = json.loads(ok("root", "show", str(r1), "--json"))
    assert shown["version"] == 1 and shown["signatures"][0]["signature"] == "valid"
    ok("root", "publish", str(r1), "--config", cfg)

    # A device provisioned with root v1 (and no trusted_keys).
    dev = tmp_path / "device"
    (dev / "app").mkdir(parents=True)
    toml = write_agent_toml(
        dev / "agent.toml",
        server=releaser.address,
        tls_pin=releaser.tls_pin,
        app="sensor",
        version="1.0",
        device_id="dev-1",
        state_dir="state",
        app_root="app",
        root=str(r1),
    )

    # Rotation: a new root key and a new release key.
    r2 = tmp_path / "root-2.json"
    ok(
        "root",
        "init",
        "--from",
        str(r1),
        "--root-key",
        f"{keys}/root2.key.pub",
        "--release-key",
        f"{keys}/release2.key.pub",
        "--out",
        str(r2),
    )
    ok("root", "sign", str(r2), "--key", f"{keys}/root2.key")
    # Only the new root key signed: the releaser refuses it as a device would.
    assert "checked by the trusted root 1" in refused(
        EXIT_USAGE, "root", "publish", str(r2), "--config", cfg
    )
    ok("root", "sign", str(r2), "--key", f"{keys}/root1.key")
    ok("root", "publish", str(r2), "--config", cfg)
    # Another version 1 is a conflict (exit 6); the same file again is fine.
    other = tmp_path / "other-1.json"
    ok(
        "root",
        "init",
        "--root-key",
        f"{keys}/root2.key.pub",
        "--release-key",
        f"{keys}/release2.key.pub",
        "--out",
        str(other),
    )
    ok("root", "sign", str(other), "--key", f"{keys}/root2.key")
    assert "already published with other content" in refused(
        EXIT_CONFLICT, "root", "publish", str(other), "--config", cfg
    )
    assert "already published" in ok("root", "publish", str(r1), "--config", cfg)

    # The old release key no longer publishes; the new one does.
    src = make_tree(tmp_path / "src", {"app.txt": b"sensor 2.0\n"})
    old = run_cli(
        "release", "publish", str(src), "--app", "sensor", "--version", "2.0", "--config", cfg
    )
    assert old.code != EXIT_OK and "refused" in old.err, old
    ok(
        "release",
        "publish",
        str(src),
        "--app",
        "sensor",
        "--version",
        "2.0",
        "--key",
        f"{keys}/release2.key",
        "--config",
        cfg,
    )
    ok("release", "promote", "sensor", "2.0", "pre-released", "--config", cfg)
    ok("release", "promote", "sensor", "2.0", "approved", "--config", cfg)

    check = run_cli("update", "--check", "--json", "--config", str(toml))
    assert check.code == EXIT_OK, check
    answer = json.loads(check.out)
    assert (answer["available"], answer["newest"]) == (True, "2.0")
    persisted = envelope_from_json((dev / "state" / "root.json").read_bytes())
    assert Root.from_bytes(persisted.signed).version == 2


def test_root_errors_are_one_line(tmp_path: Path) -> None:
    assert "cannot read it" in refused(EXIT_USAGE, "root", "show", str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert "not a root file" in refused(EXIT_USAGE, "root", "show", str(bad))
    key = tmp_path / "k.key"
    ok("keygen", "--out", str(key))
    line = refused(
        EXIT_USAGE,
        "root",
        "init",
        "--root-key",
        f"{key}.pub",
        "--release-key",
        f"{key}.pub",
        "--threshold",
        "2",
        "--out",
        str(tmp_path / "r.json"),
    )
    assert "threshold 2" in line
