"""A plain HTTP(S) file server for image imports: what tests and the test ground fetch images from.

It serves the files under ``--root`` with ``Content-Length`` and single ranges (``Range: bytes=N-`` or
``N-M``, answered 206), and writes one JSON line per request to ``--log`` (method, path, the Range
header, status, bytes sent), so a test can count downloads and see a resume. Controls, for faults:

- ``POST /_control/drop?path=/x.qcow2&fraction=0.5``: the next GET of that path sends that fraction of
  its body, then closes the connection;
- ``POST /_control/fail?path=/x.qcow2&status=503&count=2``: the next ``count`` GETs of it get that status;
- ``POST /_control/rate?path=/x.qcow2&bps=1000000``: every later GET of it sends at most that many bytes a
  second (so a test's downloads overlap).

Run as ``python -m testground.fileserver --root DIR --bind ADDR --port N --log FILE [--cert C --key K]``,
or in-process: ``FileServer(root, log).start()`` ... ``.stop()``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import pathlib
import re
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
CHUNK = 1 << 20


class FileServer:
    """The server, its controls and its access log; ``port=0`` picks a free port (see ``.port``)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        log: str | os.PathLike[str],
        bind: str = "127.0.0.1",
        port: int = 0,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = pathlib.Path(root).resolve()
        self.log = pathlib.Path(log)
        self.drops: dict[str, float] = {}
        self.failures: dict[str, tuple[int, int]] = {}
        self.rates: dict[str, int] = {}
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.in_flight = 0
        self.httpd = _Server((bind, port), _Handler)
        self.httpd.files = self
        self.scheme = "http"
        if cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(cert), str(key) if key else None)
            # The handshake happens in the request's thread, so a client that never shakes hands
            # (or fails to) holds up no one else.
            self.httpd.socket = context.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
            self.scheme = "https"
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}/{path.lstrip('/')}"

    def start(self) -> FileServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fileserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join()

    def requests(self) -> list[dict[str, Any]]:
        """The access log so far, one dict per request, once no request is under way (a client may have
        all its bytes a moment before the server logs them)."""
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight == 0, timeout=10)
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock, open(self.log, "a") as out:
            out.write(json.dumps(entry, sort_keys=True) + "\n")

    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Count a request as under way until it is logged (or failed)."""
        with self.lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self.idle:
                self.in_flight -= 1
                self.idle.notify_all()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    files: FileServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (or refuses our certificate, as a TLS test's does) is no server error."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "kubenova-fileserver"
    protocol_version = "HTTP/1.1"

    @property
    def files(self) -> FileServer:
        assert isinstance(self.server, _Server)
        return self.server.files

    def log_message(self, format: str, *args: Any) -> None:  # the JSON log says it all
        pass

    def do_POST(self) -> None:
        with self.files.tracked():
            self._control()

    def _control(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        with self.files.lock:
            if url.path == "/_control/drop":
                self.files.drops[query["path"]] = float(query.get("fraction", "0.5"))
            elif url.path == "/_control/rate":
                self.files.rates[query["path"]] = int(query["bps"])
            elif url.path == "/_control/fail":
                self.files.failures[query["path"]] = (
                    int(query.get("status", "503")),
                    int(query.get("count", "1")),
                )
            else:
                return self._answer(404, 0)
        self._answer(204, 0)

    def do_HEAD(self) -> None:
        with self.files.tracked():
            self._serve(body=False)

    def do_GET(self) -> None:
        with self.files.tracked():
            self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        with self.files.lock:
            failure = self.files.failures.get(path)
            if failure and body:
                status, count = failure
                if count > 1:
                    self.files.failures[path] = (status, count - 1)
                else:
                    del self.files.failures[path]
        if failure and body:
            return self._answer(failure[0], 0)
        file = (self.files.root / path.lstrip("/")).resolve()
        if not file.is_file() or not file.is_relative_to(self.files.root):
            return self._answer(404, 0)
        size = file.stat().st_size
        start, end, status = 0, size - 1, 200
        match = _RANGE.fullmatch(self.headers.get("Range", ""))
        if match:
            start = int(match[1])
            end = min(int(match[2]), size - 1) if match[2] else size - 1
            if start >= size or start > end:
                return self._answer(416, 0, {"Content-Range": f"bytes */{size}"})
            status = 206
        length = end - start + 1
        headers = {"Content-Length": str(length), "Content-Type": "application/octet-stream"}
        headers["Accept-Ranges"] = "bytes"
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        with self.files.lock:
            fraction = self.files.drops.pop(path, None) if body else None
            rate = self.files.rates.get(path)
        limit = length if fraction is None else int(length * fraction)
        self._start(status, headers)
        sent = 0
        if body:
            with open(file, "rb") as f:
                f.seek(start)
                while sent < limit:
                    block = f.read(min(rate or CHUNK, CHUNK, limit - sent))
                    if not block:
                        break
                    if rate:
                        time.sleep(len(block) / rate)
                    try:
                        self.wfile.write(block)
                    except OSError:
                        break  # the client went away
                    sent += len(block)
        self._record(status, sent)
        if fraction is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # mid-body: the client sees the connection drop

    def _answer(self, status: int, sent: int, headers: dict[str, str] | None = None) -> None:
        self._start(status, {"Content-Length": "0", **(headers or {})})
        self._record(status, sent)

    def _start(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _record(self, status: int, sent: int) -> None:
        entry = {
            "time": time.time(),
            "method": self.command,
            "path": self.path,
            "status": status,
            "bytes": sent,
        }
        entry["range"] = self.headers.get("Range")
        self.files.record(entry)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m testground.fileserver", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", required=True, help="the folder whose files are served")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--log", required=True, help="access log: one JSON line per request")
    parser.add_argument("--cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--key", help="the certificate's key (PEM)")
    args = parser.parse_args(argv)
    server = FileServer(args.root, args.log, args.bind, args.port, args.cert, args.key)
    print(f"serving {server.root} on {server.url('/', args.bind)}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
