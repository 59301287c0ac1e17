"""The demo's example device app: a tiny service that answers its own version.

This file is the app's source. ``fleetpush demo`` copies it into each release
directory as ``app.py``, rewriting the two constants below, so the version a
device reports comes from the code that is actually running, not from the
updater's bookkeeping.

Run as ``python3 app.py --port-file PATH``: it listens on 127.0.0.1 (a free
port), writes the port to PATH (atomically), and answers every line it
receives with one JSON line ``{"app": ..., "version": ..., "pid": ...}``.
SIGTERM stops it cleanly. With ``CRASH_ON_START`` it exits 3 at once, like a
broken release would.

Only the standard library is used, so it runs under any Python 3.
"""

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

try:  # a dependency from 1.1.0 on, installed in the release's own env (issue 12)
    import demo_units

    DEPS = {"demo_units": demo_units.__version__}
except ImportError:
    DEPS = {}

VERSION = "0.0.0"  # rewritten per release by the demo
CRASH_ON_START = False  # rewritten to True for the demo's broken release
APP = "demo-sensor"


def _write_port(path: str, port: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port} {os.getpid()} {VERSION}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _serve(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(5.0)
        buf = b""
        try:
            while True:
                data = conn.recv(1024)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    _, buf = buf.split(b"\n", 1)
                    answer = {"app": APP, "version": VERSION, "pid": os.getpid(), "deps": DEPS}
                    conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            return


def main() -> int:
    parser = argparse.ArgumentParser(description="fleetpush demo app")
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    print(f"{APP} {VERSION} starting (pid {os.getpid()})", flush=True)
    if CRASH_ON_START:
        print(f"{APP} {VERSION}: fatal: configuration schema v3 not understood", flush=True)
        return 3
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    _write_port(args.port_file, listener.getsockname()[1])
    print(f"{APP} {VERSION} serving on port {listener.getsockname()[1]}", flush=True)
    started = time.monotonic()
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            break
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()
    listener.close()
    print(f"{APP} {VERSION} stopping after {time.monotonic() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
