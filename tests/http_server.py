"""A local HTTP server on 127.0.0.1 for download tests and benchmarks (img2dataset's tests do the same).

Routes:
  /img/<name>        the image registered under <name> (200, image/jpeg)
  /optout/<name>     the same image with `X-Robots-Tag: <header>` (?tag=noai by default)
  /missing           404
  /error             503
  /slow              sends nothing until the server is closed (or `slow_seconds`)
  /loop              302 to itself, forever
  /nolocation        302 without a Location header
  /redirect/<name>   302 to /img/<name>
  /goto?to=<url>     302 to <url> (any location: another host, an address)
  /big               a body larger than any test cap, no Content-Length (chunked)
  /hold/<name>       waits until `release()` is called, then serves the image
  /html              200 text/html (not an image)
  /flaky/<name>      503 on the first request, the image after
Every request path is counted in `hits`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class ImageServer:
    def __init__(self, images: dict[str, bytes] | None = None, *, slow_seconds: float = 30.0):
        self.images = dict(images or {})
        self.hits: Counter = Counter()
        self.dripped: Counter = Counter()  # bytes a /drip response got to send before the client left
        self.slow_seconds = slow_seconds
        self._closing = threading.Event()
        self._held = threading.Event()
        self.holding = threading.Event()  # set once a /hold request is waiting
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                parts = urlsplit(self.path)
                path, query = parts.path, parse_qs(parts.query)
                server.hits[path] += 1
                head, _, name = path.lstrip("/").partition("/")
                if head == "img" and name in server.images:
                    return self._send(200, server.images[name], "image/jpeg")
                if head == "optout" and name in server.images:
                    tag = query.get("tag", ["noai"])[0]
                    return self._send(200, server.images[name], "image/jpeg", {"X-Robots-Tag": tag})
                if head == "redirect":
                    return self._send(302, b"", "text/plain", {"Location": f"/img/{name}"})
                if head == "goto" and "to" in query:
                    return self._send(302, b"", "text/plain", {"Location": query["to"][0]})
                if head == "nolocation":
                    return self._send(302, b"", "text/plain")
                if head == "loop":
                    return self._send(302, b"", "text/plain", {"Location": "/loop"})
                if head == "slow":
                    server._closing.wait(server.slow_seconds)
                    return self._send(200, b"late", "image/jpeg")
                if head == "hold" and name in server.images:
                    server.holding.set()
                    server._held.wait(60)
                    return self._send(200, server.images[name], "image/jpeg")
                if head == "big":
                    return self._chunked(b"\xff\xd8\xff" + b"\0" * (1 << 16), 64)
                if head == "flaky" and name in server.images:
                    if server.hits[path] == 1:
                        return self._send(503, b"try later", "text/plain")
                    return self._send(200, server.images[name], "image/jpeg")
                if head == "drip":  # Content-Length 40, then one byte every 0.3 s
                    return self._drip(40, 0.3, path)
                if head == "short":  # Content-Length 100, 50 bytes, then the connection closes
                    try:
                        self.send_response(200)
                        self.send_header("Content-Type", "image/jpeg")
                        self.send_header("Content-Length", "100")
                        self.end_headers()
                        self.wfile.write(b"\xff\xd8\xff" + b"\0" * 47)
                        self.wfile.flush()
                        self.close_connection = True
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return None
                if head == "error":
                    return self._send(503, b"busy", "text/plain")
                if head == "html":
                    return self._send(200, b"<html>not an image</html>", "text/html")
                return self._send(404, b"not found", "text/plain")

            def _send(self, code: int, body: bytes, kind: str, headers: dict | None = None):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _drip(self, length: int, every: float, path: str):
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(length))
                    self.end_headers()
                    for _ in range(length):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        server.dripped[path] += 1
                        if server._closing.wait(every):
                            return
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _chunked(self, chunk: bytes, times: int):
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for _ in range(times):
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(ThreadingHTTPServer):
            # The default listen backlog of 5 drops connects when eight fetch threads open at once;
            # the client's SYN retry then comes after 1 s, past the tests' short timeouts.
            request_queue_size = 128

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def release(self) -> None:
        self._held.set()

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._held.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_forever(images: dict[str, bytes]) -> None:
    """Run a server in this process until killed, printing its base URL (benchmarks)."""
    with ImageServer(images) as server:
        print(server.base, flush=True)
        while True:
            time.sleep(3600)
