"""Every failure a sentence (issue 11, item 4), through the real `fleetpush` script.

Each case asserts the one line on stderr (``fleetpush: <what failed>: <why>
[hint]``), no traceback, and the exit code of README.md, "Exit codes".
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_helpers import FLEETPUSH, Releaser, Result, run_cli
from fp_devices import write_agent_toml

from fleetpush.cli.exitcodes import (
    EXIT_AUTH,
    EXIT_CONFLICT,
    EXIT_FAILURE,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

#: `fleetpush: <what failed>: <why>` and maybe ` [hint]`, nothing else.
LINE = re.compile(r"^fleetpush( server)?: [^\n]+: [^\n]+$")


#: A log record (`fleetpush server` logs what it does at WARNING by default).
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


def one_line(r: Result) -> str:
    """The single line on stderr besides log records; fails on a traceback or more lines."""
    assert "Traceback" not in r.err, r.err
    lines = [x for x in r.err.strip().splitlines() if not LOG_RECORD.match(x)]
    assert len(lines) == 1, r.err
    assert LINE.match(lines[0]), lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def device(tmp_path: Path, server: str, **settings: object) -> Path:
    """An agent.toml for device dev-1 of app sensor, v1.0.0."""
    root = tmp_path / "device"
    (root / "app").mkdir(parents=True, exist_ok=True)
    base: dict[str, object] = dict(
        server=server,
        app="sensor",
        version="1.0.0",
        device_id="dev-1",
        state_dir=str(root / "state"),
        app_root=str(root / "app"),
        trusted_keys=["ab" * 32],
        connect_timeout=1,
        check_timeout=3,
        insecure=True,
    )
    base.update(settings)
    return write_agent_toml(root / "agent.toml", **base)


def for_releaser(tmp_path: Path, r: Releaser, **settings: object) -> Path:
    """agent.toml trusting ``r``'s release key and pinning its certificate."""
    base: dict[str, object] = dict(trusted_keys=[r.release_pub], tls_pin=r.tls_pin, insecure=False)
    base.update(settings)
    return device(tmp_path, r.address, **base)


def console(r: Releaser, *args: str) -> Result:
    return run_cli(*args, "--config", str(r.config))


def publish_approved(r: Releaser, tmp_path: Path, version: str) -> None:
    src = tmp_path / f"src-{version}"
    src.mkdir()
    (src / "main.py").write_text(f"print('{version}')\n")
    # Fixed chunks: these tests are about refusals and messages, and their device
    # must be able to fetch the release whether or not it announces "chunks-v"
    # (content-defined chunks, the default, need it: PROTOCOL.md §7.3.3).
    pub = console(
        r, "release", "publish", str(src), "--app", "sensor", "--version", version,
        "--chunking", "fixed",
    )
    assert pub.code == 0, pub.err
    for status in ("pre-released", "approved"):
        res = console(r, "release", "promote", "sensor", version, status)
        assert res.code == 0, res.err


@contextmanager
def manual_releaser(tmp_path: Path) -> Iterator[Releaser]:
    """A `fleetpush server` whose new devices wait for an operator (--enrollment manual)."""
    from fleetpush.demo.processes import Children

    keys = tmp_path / "mkeys"
    keys.mkdir()
    op = run_cli("keygen", "--out", str(keys / "operator.key"))
    rel = run_cli("keygen", "--out", str(keys / "release.key"))
    with Children(tmp_path / "mlogs") as children:
        child, host, port = children.start_server(
            tmp_path / "mdata",
            operator_keys=[op.out.strip()],
            insecure=False,
            release_keys=[rel.out.strip()],
            extra=["--enrollment", "manual"],
        )
        config = tmp_path / "mconsole.toml"
        config.write_text(
            f'server = "{host}:{port}"\ntls_pin = "{child.tls_pin}"\n'
            'operator_key = "mkeys/operator.key"\n'
        )
        yield Releaser(
            address=f"{host}:{port}",
            data_dir=tmp_path / "mdata",
            config=config,
            operator_key=keys / "operator.key",
            release_key=keys / "release.key",
            release_pub=rel.out.strip(),
            pid=child.pid,
            tls_pin=child.tls_pin,
        )


# --- the releaser down, silent, refusing -------------------------------------------------


@pytest.mark.parametrize("argv", [("update", "--check"), ("status", "--check")])
def test_releaser_down_is_one_line_and_exit_3(tmp_path: Path, argv: tuple[str, ...]) -> None:
    port = free_port()
    toml = device(tmp_path, f"127.0.0.1:{port}")
    r = run_cli(*argv, "-c", str(toml))
    assert r.code == EXIT_UNREACHABLE, r
    line = one_line(r)
    assert line.startswith(f"fleetpush: cannot reach the releaser at 127.0.0.1:{port}: ")


def test_silent_releaser_is_one_line_and_exit_3(tmp_path: Path) -> None:
    """It accepts TCP (the kernel does, from the listen backlog) and never says a word."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        toml = device(tmp_path, f"127.0.0.1:{port}", tls_pin="cd" * 32, insecure=False)
        r = run_cli("update", "--check", "-c", str(toml))
    assert r.code == EXIT_UNREACHABLE, r
    assert one_line(r).startswith(f"fleetpush: cannot reach the releaser at 127.0.0.1:{port}")


def test_verbose_shows_the_traceback_and_the_line(tmp_path: Path) -> None:
    toml = device(tmp_path, f"127.0.0.1:{free_port()}")
    r = run_cli("-v", "update", "--check", "-c", str(toml))
    assert r.code == EXIT_UNREACHABLE
    assert "Traceback" in r.err
    assert r.err.strip().splitlines()[-1].startswith("fleetpush: cannot reach the releaser")


def test_device_pending_enrolment_exits_4(tmp_path: Path) -> None:
    with manual_releaser(tmp_path) as r:
        toml = for_releaser(tmp_path, r)
        for argv in (("update", "--check"), ("status", "--check")):
            res = run_cli(*argv, "-c", str(toml))
            assert res.code == EXIT_AUTH, (argv, res)
            assert one_line(res) == (
                f"fleetpush: the releaser at {r.address} has not accepted device dev-1 yet "
                "[an operator runs: fleetpush devices accept dev-1]"
            )


def test_release_short_of_signatures_is_one_line_and_exit_1(
    releaser: Releaser, tmp_path: Path
) -> None:
    """The device wants 2 of its 2 keys; the releaser signs with one."""
    publish_approved(releaser, tmp_path, "1.1.0")
    toml = for_releaser(
        tmp_path, releaser, trusted_keys=[releaser.release_pub, "ef" * 32], threshold=2
    )
    for argv in (("update", "--check"), ("status", "--check")):
        r = run_cli(*argv, "-c", str(toml))
        assert r.code == EXIT_FAILURE, (argv, r)
        assert one_line(r) == (
            "fleetpush: the offered release was refused: 1 trusted signature(s), 2 required"
        )


def test_update_to_a_missing_version_names_no_codes(releaser: Releaser, tmp_path: Path) -> None:
    publish_approved(releaser, tmp_path, "1.1.0")
    toml = for_releaser(tmp_path, releaser)
    r = run_cli("update", "--to", "9.9.9", "--no-start", "-c", str(toml))
    assert r.code == EXIT_NOT_FOUND, r
    line = one_line(r)
    assert "9.9.9" in line
    assert not re.search(r"\[-?\d+\]", line), line  # no "[4]"
    assert "get_manifest" not in line and "check_update" not in line


def test_console_refusal_names_the_action_not_the_rpc_method(
    releaser: Releaser, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    assert (
        console(
            releaser, "release", "publish", str(src), "--app", "sensor", "--version", "1.0"
        ).code
        == 0
    )
    r = console(releaser, "release", "promote", "sensor", "1.0", "approved")
    assert r.code == EXIT_CONFLICT, r
    line = one_line(r)
    assert "set_release_status" not in line
    assert line.startswith("fleetpush: changing the release status: ")


# --- config and arguments ----------------------------------------------------------------


def test_bad_channel_is_one_sentence_not_an_attrs_dump(tmp_path: Path) -> None:
    toml = device(tmp_path, "127.0.0.1:7878", channel="nightly")
    r = run_cli("status", "-c", str(toml), cwd=toml.parent)
    assert r.code == EXIT_USAGE
    assert one_line(r) == f"fleetpush: {toml}: channel must be stable or beta, got 'nightly'"
    r = run_cli("status", "-c", "agent.toml", cwd=toml.parent)
    assert one_line(r) == "fleetpush: agent.toml: channel must be stable or beta, got 'nightly'"


def test_bad_number_setting_is_one_sentence(tmp_path: Path) -> None:
    toml = device(tmp_path, "127.0.0.1:7878", check_timeout="soon")
    r = run_cli("status", "-c", str(toml))
    assert r.code == EXIT_USAGE
    assert one_line(r) == f"fleetpush: {toml}: check_timeout must be a number, got 'soon'"


def test_bad_server_address_is_a_usage_error(tmp_path: Path) -> None:
    toml = device(tmp_path, "127.0.0.1:7878")
    r = run_cli("update", "--check", "-c", str(toml), "--server", "bad:addr:x")
    assert r.code == EXIT_USAGE, r
    assert one_line(r).startswith("fleetpush: server: bad address 'bad:addr:x': ")


# --- fleetpush server and watch ----------------------------------------------------------


def test_server_on_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A port in use is a --listen the user must change: exit 2 (README.md, "Exit codes")."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = run_cli("server", "--data-dir", str(tmp_path / "d"), "--listen", f"127.0.0.1:{port}")
    assert r.code == EXIT_USAGE, r
    assert one_line(r) == (
        f"fleetpush server: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in "
        "use [another process holds the port: stop it, or pick another with --listen]"
    )


def test_watch_into_a_closed_pipe_exits_quietly(releaser: Releaser, tmp_path: Path) -> None:
    """`fleetpush watch | head -1`: exit 141 (128 + SIGPIPE) like git, no traceback."""
    publish_approved(releaser, tmp_path, "1.0.1")
    with subprocess.Popen(
        [FLEETPUSH, "watch", "--config", str(releaser.config), "--history", "5", "--for", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as watch:
        assert watch.stdout is not None and watch.stderr is not None
        assert watch.stdout.readline()
        watch.stdout.close()  # what head does after its line
        deadline = time.monotonic() + 20
        n = 0
        while watch.poll() is None and time.monotonic() < deadline:
            n += 1  # more events, to be written into the closed pipe
            src = tmp_path / f"more-{n}"
            src.mkdir()
            (src / "a").write_text(str(n))
            console(releaser, "release", "publish", str(src), "--app", "x", "--version", f"{n}")
            console(releaser, "release", "promote", "x", f"{n}", "pre-released")
            time.sleep(0.2)
        code = watch.wait(10)
        err = watch.stderr.read()
    assert code == 141, (code, err)
    assert err == ""


def test_the_agent_logs_an_unreachable_releaser_without_v(tmp_path: Path) -> None:
    # issue 11: a device whose releaser is down must say so in its log by default.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        "\n".join(
            [
                f'server = "127.0.0.1:{port}"',
                'app = "demo"',
                'version = "1.0.0"',
                'device_id = "dev-1"',
                f'state_dir = "{tmp_path / "state"}"',
                f'app_root = "{tmp_path}"',
                'trusted_keys = ["' + "ab" * 32 + '"]',
                "insecure = true",
                "auto_check = false",
                "backoff_initial = 0.1",
                "backoff_max = 0.2",
            ]
        )
        + "\n"
    )
    proc = subprocess.Popen(
        [FLEETPUSH, "agent", "--config", str(cfg), "--", sys.executable, "-c",
         "import time; time.sleep(30)"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = ""
        for _ in range(200):
            line = proc.stdout.readline()
            seen += line
            if f"releaser 127.0.0.1:{port}: backoff" in line:
                break
        assert f"releaser 127.0.0.1:{port}: backoff" in seen, seen
        assert "INFO" in seen
    finally:
        proc.terminate()
        proc.wait(15)
        assert proc.stdout is not None
        proc.stdout.close()
