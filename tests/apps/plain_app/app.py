"""A small real app that knows nothing of fleetpush (run under ``fleetpush agent``).

    python app.py STATUS_FILE

Reads its version from ``version.txt`` beside it and its behaviour from
``behavior.txt`` (``ok``; ``crash``: exit 3 after a moment; ``crash-if-flagged``:
the same on a device whose ``STATUS_FILE.crash`` exists, so one release fails
on some devices only). Answers its version on a TCP port and writes
``PORT VERSION PID`` to STATUS_FILE.
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


def main(status_file: str) -> None:
    print(f"app {VERSION} starting (pid {os.getpid()})", flush=True)
    flagged = BEHAVIOR == "crash-if-flagged" and Path(status_file + ".crash").exists()
    if BEHAVIOR == "crash" or flagged:
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
    print(f"app {VERSION} serving on {port}", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(f"{VERSION}\n".encode())


if __name__ == "__main__":
    main(sys.argv[1])
