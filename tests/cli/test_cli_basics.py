"""The CLI without a releaser: --version, help, keygen, config and usage errors."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from cli_helpers import run_cli
from fleetpush.protocol.keys import private_key_from_pem, public_bytes

from fleetpush import __version__
from fleetpush.cli.exitcodes import EXIT_UNREACHABLE, EXIT_USAGE


def test_version() -> None:
    r = run_cli("--version")
    assert r.code == 0
    assert r.out.strip() == f"fleetpush {__version__}"


def test_every_command_has_help() -> None:
    top = run_cli("--help")
    assert top.code == 0
    for command in (
        "demo",
        "keygen",
        "release",
        "devices",
        "push",
        "apply",
        "watch",
        "bench",
        "server",
    ):
        assert command in top.out
        r = run_cli(command, "--help")
        assert r.code == 0, (command, r.err)
        assert "usage: fleetpush" in r.out
    for sub in ("publish", "list", "promote", "revoke"):
        assert run_cli("release", sub, "--help").code == 0
    for sub in ("accept", "reject"):
        assert run_cli("devices", sub, "--help").code == 0


def test_no_command_is_a_usage_error() -> None:
    assert run_cli().code == EXIT_USAGE


def test_keygen_writes_private_key_0600_and_prints_public(tmp_path: Path) -> None:
    key = tmp_path / "op.key"
    r = run_cli("keygen", "--out", str(key))
    assert r.code == 0, r.err
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    raw = public_bytes(private_key_from_pem(key.read_bytes()))
    assert r.out.strip() == raw.hex()
    assert (tmp_path / "op.key.pub").read_text().strip() == raw.hex()


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    key = tmp_path / "k"
    first = run_cli("keygen", "--out", str(key))
    again = run_cli("keygen", "--out", str(key))
    assert again.code == EXIT_USAGE
    assert "exists" in again.err
    assert key.exists() and first.out.strip() == (tmp_path / "k.pub").read_text().strip()
    forced = run_cli("keygen", "--out", str(key), "--force", "--json")
    assert forced.code == 0
    doc = json.loads(forced.out)
    assert doc["public_key"] != first.out.strip()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_unreachable_releaser_exit_code(tmp_path: Path) -> None:
    key = tmp_path / "op.key"
    run_cli("keygen", "--out", str(key))
    r = run_cli("devices", "--server", "127.0.0.1:1", "--operator-key", str(key), "--insecure")
    assert r.code == EXIT_UNREACHABLE
    assert "cannot reach the releaser" in r.err


def test_missing_operator_key_is_a_usage_error(tmp_path: Path) -> None:
    cfg = tmp_path / "console.toml"
    cfg.write_text('server = "127.0.0.1:1"\n')
    r = run_cli("release", "list", "--config", str(cfg))
    assert r.code == EXIT_USAGE
    assert "operator key" in r.err


def test_bad_config_is_a_usage_error(tmp_path: Path) -> None:
    cfg = tmp_path / "console.toml"
    cfg.write_text('server = "127.0.0.1:1"\nbogus = 1\n')
    r = run_cli("devices", "--config", str(cfg))
    assert r.code == EXIT_USAGE
    assert "bogus" in r.err
    missing = run_cli("devices", "--config", str(tmp_path / "nope.toml"))
    assert missing.code == EXIT_USAGE


def test_flags_override_config(tmp_path: Path) -> None:
    key = tmp_path / "op.key"
    run_cli("keygen", "--out", str(key))
    cfg = tmp_path / "console.toml"
    cfg.write_text('server = "127.0.0.1:2"\noperator_key = "op.key"\ninsecure = true\n')
    r = run_cli("devices", "--config", str(cfg), "--server", "127.0.0.1:1")
    assert r.code == EXIT_UNREACHABLE
    assert "127.0.0.1:1" in r.err


def test_push_needs_a_target() -> None:
    r = run_cli("push", "--version", "1.0")
    assert r.code == EXIT_USAGE
