"""A real HTTP server on 127.0.0.1 with misbehaving routes, for URL-source tests."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Routes(BaseHTTPRequestHandler):
    image = b""
    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        Routes.hits[path] = Routes.hits.get(path, 0) + 1
        n = Routes.hits[path]
        if path.startswith("/ok/"):
            self._send(200, self.image, {"Content-Type": "image/jpeg"})
        elif path == "/404":
            self._send(404, b"nope")
        elif path == "/500":
            self._send(500, b"boom")
        elif path == "/flaky":  # fails twice, then serves
            self._send(503, b"busy") if n <= 2 else self._send(200, self.image)
        elif path == "/429":  # rate limited once, with Retry-After
            self._send(429, b"", {"Retry-After": "1"}) if n == 1 else self._send(200, self.image)
        elif path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif path == "/huge":  # claims 2 GB
            self._send(200, b"", {"Content-Length": str(2 * 1024**3)})
        elif path == "/huge-chunked":  # no length, streams past the cap
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(4096):
                    self.wfile.write(b"\0" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif path == "/truncated":  # promises more than it sends, then closes
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image[: len(self.image) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif path == "/slow":  # drips a byte every 2 s
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(30):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(2)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif path == "/html":
            self._send(200, b"<html>not an image</html>", {"Content-Type": "text/html"})
        elif path == "/reset":
            self.request.close()
        else:
            self._send(404)


class LocalServer:
    def __init__(self, image: bytes):
        Routes.image = image
        Routes.hits = {}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Routes)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
