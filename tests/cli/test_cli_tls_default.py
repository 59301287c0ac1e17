"""TLS is the default (issue 10, item 14): through the real `fleetpush` entry points.

`fleetpush server` makes its own key and certificate in the data dir on first
start and prints the pin; the console and the device refuse to talk without a
pin, a CA or an explicit ``insecure``; ``--insecure`` on both ends is plain TCP
with a warning. specs/THREATS.md, "Transport modes", cites these tests.
"""

from __future__ import annotations

import json
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import Releaser, run_cli
from fleetpush.client import ConfigError, UpdaterConfig
from fleetpush.protocol.keys import public_bytes

from fleetpush.cli.exitcodes import EXIT_UNREACHABLE, EXIT_USAGE
from fleetpush.demo.processes import Children
from fleetpush.net.keys import generate_private_key
from fleetpush.net.tls import certificate_names, pem_fingerprint

NO_TRUST = (
    "fleetpush: no way to trust the releaser: set tls_pin (printed by fleetpush server) "
    "or tls_ca, or pass --insecure for plain TCP"
)


@pytest.fixture
def operator_key(tmp_path: Path) -> tuple[Path, str]:
    key = tmp_path / "keys" / "operator.key"
    key.parent.mkdir()
    r = run_cli("keygen", "--out", str(key))
    assert r.code == 0, r.err
    return key, r.out.strip()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    with Children(tmp_path / "logs") as kids:
        yield kids


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_first_start_makes_key_and_cert_and_later_starts_reuse_them(
    tmp_path: Path, children: Children, operator_key: tuple[Path, str]
) -> None:
    data = tmp_path / "data"
    before = run_cli("server", "--data-dir", str(data), "--print-pin")
    assert before.code == EXIT_USAGE
    assert "no releaser certificate" in one_line(before.err)
    assert not data.exists()  # --print-pin creates nothing

    child, _, _ = children.start_server(
        data, operator_keys=[operator_key[1]], insecure=False, extra=["--tls-name", "fp.example"]
    )
    cert, key = data / "tls" / "releaser.pem", data / "tls" / "releaser.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert child.tls_pin == pem_fingerprint(cert)
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert {"localhost", "fp.example"} <= certificate_names(der)
    printed = run_cli("server", "--data-dir", str(data), "--print-pin")
    assert printed.code == 0 and printed.out.strip() == child.tls_pin
    first_pin, first_key = child.tls_pin, key.read_bytes()
    child.stop()

    again, _, _ = children.start_server(data, operator_keys=[operator_key[1]], insecure=False)
    assert again.tls_pin == first_pin
    assert key.read_bytes() == first_key


def test_console_needs_a_pin_a_ca_or_insecure(releaser: Releaser, tmp_path: Path) -> None:
    bare = tmp_path / "bare.toml"
    bare.write_text(f'server = "{releaser.address}"\noperator_key = "{releaser.operator_key}"\n')
    for argv in (
        ["devices"],
        ["release", "list"],
        ["push", "--version", "1.0", "--all", "--app", "demo"],
    ):
        r = run_cli(*argv, "--config", str(bare))
        assert r.code == EXIT_USAGE, (argv, r.err)
        assert one_line(r.err) == NO_TRUST

    # the fixture's console.toml pins the printed certificate
    pinned = run_cli("devices", "--json", "--config", str(releaser.config))
    assert pinned.code == 0, pinned.err
    assert json.loads(pinned.out) == [] and pinned.err == ""
    assert releaser.tls_pin is not None
    by_flag = run_cli("devices", "--config", str(bare), "--tls-pin", releaser.tls_pin)
    assert by_flag.code == 0, by_flag.err
    # the self-signed certificate also serves as its own CA
    ca = releaser.data_dir / "tls" / "releaser.pem"
    by_ca = run_cli("devices", "--json", "--config", str(bare), "--tls-ca", str(ca))
    assert by_ca.code == 0, by_ca.err


def test_a_wrong_pin_or_plain_tcp_to_a_tls_releaser_fails(
    releaser: Releaser, tmp_path: Path
) -> None:
    bare = tmp_path / "bare.toml"
    bare.write_text(f'server = "{releaser.address}"\noperator_key = "{releaser.operator_key}"\n')
    wrong = run_cli("devices", "--config", str(bare), "--tls-pin", "ab" * 32)
    assert wrong.code == EXIT_UNREACHABLE
    assert "does not match the pin" in one_line(wrong.err)
    plain = run_cli("devices", "--config", str(bare), "--insecure", "--timeout", "3")
    assert plain.code != 0


def test_insecure_on_both_ends_is_plain_tcp_with_warnings(
    tmp_path: Path, children: Children, operator_key: tuple[Path, str]
) -> None:
    data = tmp_path / "data"
    child, host, port = children.start_server(data, operator_keys=[operator_key[1]], insecure=True)
    assert child.tls_pin is None
    assert not (data / "tls").exists()
    log = child.log.read_text()
    assert "fleetpush server: warning: --insecure: plain TCP" in log
    key = str(operator_key[0])
    r = run_cli(
        "devices", "--json", "--server", f"{host}:{port}", "--operator-key", key, "--insecure"
    )
    assert r.code == 0, r.err
    assert json.loads(r.out) == []
    assert one_line(r.err).startswith("fleetpush: warning: plain TCP (--insecure)")
    # a pin can never be satisfied by plain TCP: no silent downgrade
    pinned = run_cli(
        "devices", "--server", f"{host}:{port}", "--operator-key", key, "--tls-pin", "ab" * 32
    )
    assert pinned.code == EXIT_UNREACHABLE, pinned.err


def test_server_toml_insecure_and_contradictions(tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text('data_dir = "data"\ninsecure = "yes"\n')
    r = run_cli("server", "--config", str(toml))
    assert r.code == EXIT_USAGE and "insecure must be true or false" in r.err
    cert = tmp_path / "c.pem"
    r = run_cli(
        "server", "--data-dir", str(tmp_path / "d"), "--insecure",
        "--tls-cert", str(cert), "--tls-key", str(cert),
    )  # fmt: skip
    assert r.code == EXIT_USAGE and "contradicts" in one_line(r.err)
    toml.write_text('data_dir = "data"\ninsecure = true\ntls_names = ["a.example"]\n')
    r = run_cli("server", "--config", str(toml), "--print-pin")
    assert r.code == EXIT_USAGE and "no releaser certificate" in r.err  # read, not refused


def agent_settings(tmp_path: Path, **extra: str) -> str:
    rel = public_bytes(generate_private_key())
    lines = [
        'server = "127.0.0.1:1"',
        'app = "demo"',
        'version = "1.0.0"',
        f'state_dir = "{tmp_path / "state"}"',
        f'app_root = "{tmp_path / "app"}"',
        f'trusted_keys = ["{rel.hex()}"]',
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


def test_a_device_config_without_trust_is_refused(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    agent = tmp_path / "agent.toml"
    agent.write_text(agent_settings(tmp_path))
    for argv in (["status", "--offline"], ["update", "--check"], ["agent", "--", "true"]):
        r = run_cli(argv[0], "--config", str(agent), *argv[1:])
        assert r.code == EXIT_USAGE, (argv, r.err)
        assert "no way to trust the releaser" in one_line(r.err)
        assert "insecure = true" in r.err

    agent.write_text(agent_settings(tmp_path, insecure="true"))
    assert run_cli("status", "--offline", "--config", str(agent)).code == 0
    agent.write_text(agent_settings(tmp_path, tls_pin='"' + "ab" * 32 + '"'))
    assert run_cli("status", "--offline", "--config", str(agent)).code == 0


def test_the_library_config_is_secure_by_default_too(tmp_path: Path) -> None:
    base = dict(app="demo", state_dir=tmp_path / "s", app_root=tmp_path / "a", trusted_keys=())
    with pytest.raises(ConfigError, match="no way to trust the releaser"):
        UpdaterConfig(**base)  # type: ignore[arg-type]
    assert UpdaterConfig(**base, insecure=True).client_tls() is None  # type: ignore[arg-type]
    pinned = UpdaterConfig(**base, tls_pin="ab" * 32)  # type: ignore[arg-type]
    tls = pinned.client_tls()
    assert tls is not None and tls.pin_sha256 == "ab" * 32
