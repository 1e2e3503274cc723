"""S3 for tests: moto's server on 127.0.0.1, and a proxy in front of it that injects store faults.

`FaultyS3` forwards every request to the emulator and, with a seeded probability per request,
answers instead as a failing S3 does:

- `503`: SlowDown, without forwarding (S3's throttling answer; clients retry it);
- `500`: InternalError, without forwarding;
- `cut`: forwards the request, then closes the connection part way through the response: a read
  gets half its bytes, a write is applied by the store but its answer never arrives (the case a
  retried conditional PUT of a Delta commit meets: the object is there, and it was ours).

At most `max_in_a_row` faults in a row hit one method and path, so a client's own retries can get
through; `requests` records (method, path, the If-None-Match / If-Match headers) of every forwarded
request, which tells what a client relied on. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

FAULTS = ("503", "500", "cut")
_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
        '<RequestId>fault</RequestId></Error>')
_ANSWERS = {"503": ("SlowDown", "Please reduce your request rate."),
            "500": ("InternalError", "We encountered an internal error. Please try again.")}


class FaultyS3:
    def __init__(self, upstream: str, *, rate: float = 0.0, seed: int = 0, faults=FAULTS, max_in_a_row: int = 2):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.rate, self.faults, self.max_in_a_row = rate, tuple(faults), max_in_a_row
        self.injected: Counter = Counter()
        self.requests: list[tuple[str, str, str | None, str | None]] = []
        self._rng = random.Random(seed)
        self._streak: Counter = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                """The request body's bytes; a chunked upload (S3's aws-chunked, its checksum in a
                trailer) decoded, to be forwarded as a plain one."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()

            def _handle(self):
                body = self._body()
                if "aws-chunked" in self.headers.get("Content-Encoding", ""):
                    body = _aws_unchunked(body)
                fault = proxy._draw(self.command, self.path)
                if fault in _ANSWERS:
                    code, message = _ANSWERS[fault]
                    payload = _XML.format(code=code, message=message).encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                drop = ("transfer-encoding", "content-length", "expect", "content-encoding", "x-amz-trailer",
                        "x-amz-decoded-content-length", "x-amz-content-sha256")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
                headers["Content-Length"] = str(len(body))
                headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"  # the emulator checks no signature
                with proxy._lock:
                    proxy.requests.append((self.command, self.path.split("?")[0], self.headers.get("If-None-Match"),
                                           self.headers.get("If-Match")))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fault == "cut":
                    # The store did the work; the client sees its connection drop part way.
                    if data and self.command != "HEAD":
                        self.send_response(resp.status)
                        for k, v in resp.getheaders():
                            if k.lower() not in ("transfer-encoding", "connection"):
                                self.send_header(k, v)
                        self.end_headers()
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    # A HEAD's Content-Length is the object's size: passed on as the store sent it.
                    if k.lower() not in ("transfer-encoding", "connection") and \
                            (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _draw(self, method: str, path: str) -> str | None:
        key = (method, path)
        with self._lock:
            if self.rate <= 0 or self._streak[key] >= self.max_in_a_row or self._rng.random() >= self.rate:
                self._streak[key] = 0
                return None
            fault = self._rng.choice(self.faults)
            self._streak[key] += 1
            self.injected[fault] += 1
            return fault

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _aws_unchunked(body: bytes) -> bytes:
    """The payload of an aws-chunked body (`<hex size>[;signature]\\r\\n<bytes>\\r\\n`..., then
    trailers), forwarded as a plain body."""
    out, at = b"", 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return out
        out += body[end + 2:end + 2 + size]
        at = end + 2 + size + 2


def s3_environment(endpoint: str) -> dict[str, str]:
    """The variables a process needs to reach the emulator (credentials from the environment only,
    as in production)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1"}


def upload_tree(s3, local: Path, bucket: str, prefix: str) -> str:
    """Every file under `local` to s3://bucket/prefix/..., as laid out locally."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(p for p in local.rglob("*") if p.is_file())
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}"), files))
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def s3_server():
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_environment(s3_server).items():
        monkeypatch.setenv(key, value)
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"recap-{len(s3.list_buckets()['Buckets'])}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket
