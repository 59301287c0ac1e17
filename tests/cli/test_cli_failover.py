"""The console with several releaser addresses (issue 15, §2): a real ``fleetpush
server`` subprocess, a dead address before it, and the real ``fleetpush`` script.

The operator client tries the addresses in order, each with a short connect
timeout, says with ``-v`` which one answered, and names every address it
tried when none answers (exit 3, README "Exit codes").
"""

from __future__ import annotations

import os
import socket

import trio
from cli_helpers import Releaser, run_cli


def _dead_address() -> str:
    """An address on 127.0.0.1 where nothing listens (connect is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_dead_first_address_falls_over_to_the_second(releaser: Releaser) -> None:
    dead = _dead_address()
    with trio.fail_after(60):
        ran = await trio.to_thread.run_sync(
            lambda: run_cli(
                "-v",
                "devices",
                "--json",
                "--config",
                str(releaser.config),
                "--server",
                f"{dead},{releaser.address}",
            )
        )
    assert ran.code == 0, ran
    assert f"releaser {releaser.address} answered" in ran.err
    assert f"releaser {dead}: cannot reach the releaser" in ran.err


async def test_env_var_and_pin_list(releaser: Releaser) -> None:
    """``$FLEETPUSH_SERVER`` takes a list too; a config ``tls_pin`` list matches any pin."""
    text = releaser.config.read_text().replace(
        f'tls_pin = "{releaser.tls_pin}"', f'tls_pin = ["{"00" * 32}", "{releaser.tls_pin}"]'
    )
    assert text != releaser.config.read_text()
    config = releaser.config.with_name("console-pins.toml")
    config.write_text(text)
    env = {**os.environ, "FLEETPUSH_SERVER": f"{_dead_address()},{releaser.address}"}
    with trio.fail_after(60):
        ran = await trio.to_thread.run_sync(
            lambda: run_cli("devices", "--json", "--config", str(config), env=env)
        )
    assert ran.code == 0, ran


async def test_no_address_answers_one_line_naming_each(releaser: Releaser) -> None:
    first, second = _dead_address(), _dead_address()
    with trio.fail_after(60):
        ran = await trio.to_thread.run_sync(
            lambda: run_cli(
                "devices", "--config", str(releaser.config), "--server", f"{first},{second}"
            )
        )
    assert ran.code == 3, ran
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1, ran.err
    assert lines[0].startswith("fleetpush: ")
    assert f"no releaser answered (tried {first}, {second})" in lines[0]
    assert lines[0].count("cannot reach the releaser") == 2


def test_bad_address_in_the_list_is_a_usage_error(releaser: Releaser) -> None:
    ran = run_cli(
        "devices", "--config", str(releaser.config), "--server", f"{releaser.address},b:x"
    )
    assert ran.code == 2, ran
    assert "the port 'x' is not a number" in ran.err
