"""A small real app whose release may carry a Python env (run under ``fleetpush agent``).

    python app.py STATUS_FILE

Like plain_app (``version.txt``, ``behavior.txt``: ``ok`` or ``crash``, and
``PORT VERSION PID`` in STATUS_FILE), but it answers on its port what it
runs with: ``VERSION alpha=<alpha.__version__ or none> prefix=<sys.prefix>``,
so a test asks the app itself which env it got.
"""

import os
import signal
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = (HERE / "version.txt").read_text().strip()
BEHAVIOR = (HERE / "behavior.txt").read_text().strip() if (HERE / "behavior.txt").exists() else "ok"

try:
    import alpha  # type: ignore[import-not-found]

    ALPHA = alpha.__version__
except ImportError:
    ALPHA = "none"


def main(status_file: str) -> None:
    print(f"app {VERSION} starting (pid {os.getpid()}, alpha {ALPHA})", flush=True)
    if BEHAVIOR == "crash":
        time.sleep(0.2)
        print("app crashing", flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    tmp = status_file + ".tmp"
    Path(tmp).write_text(f"{port} {VERSION} {os.getpid()}\n")
    os.replace(tmp, status_file)
    answer = f"{VERSION} alpha={ALPHA} prefix={sys.prefix}\n".encode()
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(answer)


if __name__ == "__main__":
    main(sys.argv[1])
