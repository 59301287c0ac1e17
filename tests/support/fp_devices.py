"""A test device: its UpdaterConfig, or its folders and agent.toml for a real app process.

Defaults are one device, ``dev-1`` of app ``demo``, trusting
:data:`fp_keys.RELEASE_KEY`, with no background checks and short back-offs,
over plain TCP (``insecure``, explicitly: a device config without it needs a
pin or CA); a suite passes what differs for it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import trio
from fleetpush.client import UpdaterConfig
from fleetpush.client.state import DeviceState, load_state
from fp_keys import RELEASE_KEY, key_hex
from fp_trees import app_release


def device_config(root: Path, server: int | str, **overrides: object) -> UpdaterConfig:
    """dev-1's config with state and app folders under ``root``; an int server is a local port.

    Raises ConfigError (fleetpush.client) if an override is invalid.
    """
    app_root = root / "app"
    app_root.mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = dict(
        app="demo",
        version="1.0",
        device_id="dev-1",
        state_dir=root / "state",
        app_root=app_root,
        server=f"127.0.0.1:{server}" if isinstance(server, int) else server,
        trusted_keys=[key_hex(RELEASE_KEY)],
        auto_check=False,
        backoff_initial=0.05,
        backoff_max=0.2,
        check_timeout=5.0,
        # the test releasers are the library's Server: plain TCP unless a test gives TLS
        insecure=True,
    )
    settings.update(overrides)
    return UpdaterConfig(**settings)  # type: ignore[arg-type]


def write_agent_toml(path: Path, **settings: object) -> Path:
    """Write ``settings`` as a flat TOML file (bools, numbers, lists of strings, strings)."""
    lines = []
    for k, v in settings.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, int | float):
            lines.append(f"{k} = {v}")
        elif isinstance(v, list | tuple):
            lines.append(f"{k} = [{', '.join(repr(str(x)).replace(chr(39), chr(34)) for x in v)}]")
        else:
            lines.append(f'{k} = "{v}"')
    path.write_text("\n".join(lines) + "\n")
    return path


class DeviceDir:
    """dev-1's folders under ``tmp_path/device``, v1 of an app kind, and its agent.toml.

    ``defaults`` are a test file's own settings; ``settings`` a single test's.
    ``v1`` is the installed release's folder (default: the app kind's plain 1.0.0).
    """

    def __init__(
        self,
        tmp_path: Path,
        port: int,
        kind: str,
        log_name: str,
        defaults: dict[str, object],
        settings: dict[str, object],
        *,
        v1: Path | None = None,
    ) -> None:
        self.root = tmp_path / "device"
        self.app_root = self.root / "app"
        self.state_dir = self.root / "state"
        self.status = self.root / "status"
        self.log = self.root / log_name
        shutil.copytree(v1 or app_release(tmp_path / "v1", kind, "1.0.0"), self.app_root)
        base: dict[str, object] = dict(
            server=f"127.0.0.1:{port}",
            app="demo",
            version="1.0.0",
            device_id="dev-1",
            state_dir=str(self.state_dir),
            app_root=str(self.app_root),
            trusted_keys=[key_hex(RELEASE_KEY)],
            auto_check=False,
            backoff_initial=0.1,
            backoff_max=0.5,
            insecure=True,  # plain TCP to the library's Server, as in device_config
        )
        base.update(defaults)
        base.update(settings)
        self.toml = write_agent_toml(self.root / "agent.toml", **base)

    def state(self) -> DeviceState:
        return load_state(self.state_dir)

    async def wait_state(
        self, pred: Callable[[DeviceState], bool], timeout: float = 30.0
    ) -> DeviceState:
        with trio.fail_after(timeout):
            while True:
                s = self.state()
                if pred(s):
                    return s
                await trio.sleep(0.1)
