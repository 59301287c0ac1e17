"""A small real HTTP app on a fixed port (run under ``fleetpush agent``), as a web service is.

    python app.py STATUS_FILE PORT

Reads its version from ``version.txt`` beside it and its behaviour from
``behavior.txt``: ``ok``, or ``slowstart`` (half a second of start-up before
it binds, as a web framework importing its routes). Binds 127.0.0.1:PORT (a
port already taken makes it exit 1: "address already in use", so under a
supervisor it crash-loops), writes ``PORT VERSION PID`` to STATUS_FILE and
answers every GET with ``VERSION PID`` (``/health`` included).
"""

import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = (HERE / "version.txt").read_text().strip()
BEHAVIOR = (HERE / "behavior.txt").read_text().strip() if (HERE / "behavior.txt").exists() else "ok"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{VERSION} {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(status_file: str, port: int) -> None:
    print(f"app {VERSION} starting (pid {os.getpid()})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if BEHAVIOR == "slowstart":
        time.sleep(0.5)
    try:
        server = HTTPServer(("127.0.0.1", port), Handler)
    except OSError as e:
        print(f"app {VERSION}: cannot listen on {port}: {e.strerror}", flush=True)
        sys.exit(1)
    tmp = status_file + ".tmp"
    Path(tmp).write_text(f"{port} {VERSION} {os.getpid()}\n")
    os.replace(tmp, status_file)
    print(f"app {VERSION} serving on {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
