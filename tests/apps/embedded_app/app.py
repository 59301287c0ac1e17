"""A small real app embedding the fleetpush Updater (tests and docs example).

    python app.py AGENT_TOML STATUS_FILE

Reads its version from ``version.txt`` beside it and its behaviour from
``behavior.txt`` (``ok``: confirm once serving; ``crash``: exit 3 at start;
``noconfirm``: never confirm; ``busy``: say busy to can_update()). It answers
its version to anyone connecting to its TCP port and writes
``PORT VERSION PID`` to STATUS_FILE (atomically) once serving.
"""

import os
import sys
from pathlib import Path

import trio
from fleetpush.client import Updater, UpdaterConfig

HERE = Path(__file__).resolve().parent
VERSION = (HERE / "version.txt").read_text().strip()
BEHAVIOR = (HERE / "behavior.txt").read_text().strip() if (HERE / "behavior.txt").exists() else "ok"


async def answer(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.send_all(f"{VERSION}\n".encode())


async def main(config_path: str, status_file: str) -> None:
    config = UpdaterConfig.from_toml(config_path)
    updater = Updater(config, can_update=lambda: BEHAVIOR != "busy")
    async with trio.open_nursery() as nursery:
        await nursery.start(updater.run)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        tmp = status_file + ".tmp"
        Path(tmp).write_text(f"{port} {VERSION} {os.getpid()}\n")
        os.replace(tmp, status_file)
        print(f"app {VERSION} serving on {port}", flush=True)
        if BEHAVIOR in ("ok", "busy"):
            updater.confirm()
        await trio.serve_listeners(answer, listeners)


if __name__ == "__main__":
    print(f"app {VERSION} starting (pid {os.getpid()})", flush=True)
    if BEHAVIOR == "crash":
        sys.exit(3)
    trio.run(main, sys.argv[1], sys.argv[2])
