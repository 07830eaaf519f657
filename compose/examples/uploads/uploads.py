"""uploads: a small web app that keeps what it is sent in a folder and serves it back.

The example service of compose/examples/uploads (README, "Use it from your service"): its
folder is on meshsync's synced volume, so when Swarm moves the service to another node,
the files are there. Standard library only, so the image builds with no network.

    PUT  /files/NAME   store the request body as NAME (201; the reply names the sha256)
    GET  /files/NAME   the bytes of NAME (404 when absent)
    GET  /files/       the names, one per line
    GET  /healthz      200 when the folder is writable

Every reply says which node served it (``X-Served-By``, the container's host name: the
stack sets it to the Swarm node's). A file is written under a temporary name that
meshsync never syncs (``.NAME.XXXXXX``, rsync's own shape) and renamed into place, so a
peer never receives half a file and a reader never sees one. Names are one path
component: no folders, no dots first.

Environment: UPLOADS_DIR (default /data/uploads), UPLOADS_LISTEN (default 0.0.0.0:8080),
UPLOADS_MAX_BYTES (default 64 MiB per file).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import string
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(os.environ.get("UPLOADS_DIR", "/data/uploads"))
LISTEN = os.environ.get("UPLOADS_LISTEN", "0.0.0.0:8080")
MAX_BYTES = int(os.environ.get("UPLOADS_MAX_BYTES", str(64 << 20)))
CHUNK = 1 << 16
NODE = socket.gethostname()
_TEMP_CHARS = string.ascii_letters + string.digits


def name_of(target: str) -> str | None:
    """The file a /files/NAME target names, or None when it is not a plain name."""
    if not target.startswith("/files/"):
        return None
    name = unquote(target.removeprefix("/files/").split("?", 1)[0])
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        return None
    return name


def store(name: str, body: bytes) -> str:
    """Write ``body`` as ``name``: a temporary name first, then one rename."""
    ROOT.mkdir(parents=True, exist_ok=True)
    tag = "".join(random.choices(_TEMP_CHARS, k=6))
    temp = ROOT / f".{name}.{tag}"
    with temp.open("wb") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    temp.replace(ROOT / name)
    return hashlib.sha256(body).hexdigest()


class Handler(BaseHTTPRequestHandler):
    server_version = "uploads/0.1"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            ok = ROOT.is_dir() and os.access(ROOT, os.W_OK)
            self._reply(200 if ok else 503, b"ok\n" if ok else b"folder not writable\n")
        elif self.path.split("?", 1)[0] == "/files/":
            names = sorted(p.name for p in ROOT.iterdir()
                           if p.is_file() and not p.name.startswith("."))
            self._reply(200, "".join(f"{n}\n" for n in names).encode())
        elif (name := name_of(self.path)) is None:
            self._reply(404, b"not found\n")
        else:
            try:
                data = (ROOT / name).read_bytes()
            except (FileNotFoundError, IsADirectoryError):
                self._reply(404, b"not found\n")
            else:
                self._reply(200, data, "application/octet-stream")

    def do_PUT(self) -> None:
        name = name_of(self.path)
        length = int(self.headers.get("Content-Length", "-1"))
        if name is None:
            self._reply(400, b"PUT /files/NAME, NAME one path component\n")
        elif not 0 <= length <= MAX_BYTES:
            self._reply(413, f"Content-Length 0..{MAX_BYTES} required\n".encode())
        else:
            body = bytearray()
            while len(body) < length:
                chunk = self.rfile.read(min(CHUNK, length - len(body)))
                if not chunk:
                    self._reply(400, b"body shorter than Content-Length\n")
                    return
                body += chunk
            digest = store(name, bytes(body))
            self._reply(201, f"{digest}  {name}\n".encode())

    def _reply(self, code: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", NODE)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{NODE} {self.address_string()} {format % args}\n")


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main() -> None:
    # As PID 1 of its container the process has no default SIGTERM action: without a
    # handler, `docker stop` (and a drain) would wait out the grace period, then kill.
    signal.signal(signal.SIGTERM, _stop)
    host, _, port = LISTEN.rpartition(":")
    ROOT.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    print(f"uploads on {NODE}: http://{LISTEN}/files/ -> {ROOT}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
