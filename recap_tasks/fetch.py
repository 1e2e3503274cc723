"""Fetch one image over HTTP(S), safely: the download stage's client (urllib3 underneath).

- SSRF: every connection resolves the host itself and refuses loopback, private, link-local,
  shared (CGNAT), reserved and multicast addresses, metadata services included
  (169.254.169.254, fd00:ec2::254), unless `allow_private_networks`. The check is made on the
  address the socket connects to (and its peer address after connecting), on every hop of a
  redirect, so DNS rebinding and redirects to internal hosts are refused as well.
- Bounded: at most `max_redirects` hops, `timeout` seconds per connect and per read, `deadline`
  seconds for the whole fetch, `max_bytes` per image (Content-Length first, then while reading),
  `per_host_connections` concurrent fetches per host.
- Opt-outs: `X-Robots-Tag` directives such as `noai`, `noimageai`, `noindex` (for all agents or
  for our user-agent token) refuse the image, as img2dataset does.

A failed fetch raises FetchFailed with a snake_case reason (`http_404`, `timeout`, `opted_out`,
`private_address`, `too_large`, `too_many_redirects`, ...): the statistics key of the download.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, LocationParseError, NameResolutionError,
                                NewConnectionError, ProtocolError, ReadTimeoutError, SSLError)
from urllib3.util.timeout import Timeout

REDIRECTS = (301, 302, 303, 307, 308)
# X-Robots-Tag rules that take a value after a colon: not a user-agent scope.
_PARAMETRIC = ("unavailable_after", "max-snippet", "max-image-preview", "max-video-preview")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 10.0
    deadline: float = 30.0
    max_redirects: int = 5
    max_bytes: int = 20 * 1024 * 1024
    per_host_connections: int = 8
    allow_private_networks: bool = False
    respect_opt_out: bool = True
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    user_agent_token: str = "recap"
    user_agent: str = "recap/0.1 (image-text recaptioning; honours X-Robots-Tag noai/noimageai)"


class FetchFailed(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class BlockedAddress(OSError):
    """The host resolves to (or the socket reached) an address the policy refuses."""


def blocked_address(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is not on the public internet (loopback, private, link-local, ...)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0] if isinstance(ip, str) else ip)
    if addr.version == 6:
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None and blocked_address(embedded):
            return True
    return not addr.is_global or addr.is_multicast


def _guarded_connect(conn: HTTPConnection, allow_private: bool) -> socket.socket:
    """Resolve, refuse blocked addresses, connect to an allowed one and check the peer again."""
    host, port, timeout = conn._dns_host, conn.port, conn.timeout
    if not isinstance(timeout, (int, float)):
        timeout = socket.getdefaulttimeout()
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    refused, error = None, None
    for family, kind, proto, _, address in infos:
        if not allow_private and blocked_address(address[0]):
            refused = address[0]
            continue
        sock = socket.socket(family, kind, proto)
        try:
            for option in conn.socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(address)
            peer = sock.getpeername()[0]
            if not allow_private and blocked_address(peer):
                raise BlockedAddress(f"{conn.host} connected to {peer}")
            return sock
        except BlockedAddress:
            sock.close()
            raise
        except socket.timeout as exc:
            sock.close()
            raise ConnectTimeoutError(conn, f"connect to {conn.host} timed out ({timeout} s)") from exc
        except OSError as exc:
            sock.close()
            error = exc
    if error is None and refused is not None:
        raise BlockedAddress(f"{conn.host} resolves to {refused}")
    raise NewConnectionError(conn, f"cannot connect to {conn.host}: {error or 'no address'}")


def _pool_classes(allow_private: bool) -> dict[str, type]:
    def connection(base: type) -> type:
        return type(f"Guarded{base.__name__}", (base,),
                    {"_new_conn": lambda self: _guarded_connect(self, allow_private)})

    return {"http": type("GuardedHTTPConnectionPool", (HTTPConnectionPool,),
                         {"ConnectionCls": connection(HTTPConnection)}),
            "https": type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,),
                          {"ConnectionCls": connection(HTTPSConnection)})}


def opt_out(values: list[str], directives: tuple[str, ...], token: str) -> str | None:
    """The opt-out directive among `X-Robots-Tag` header values that applies to us, if any.

    `noai`, `otherbot: noai` (another agent: ignored), `recap: noimageai` (ours), `none` (= noindex).
    """
    wanted = {d.lower() for d in directives}
    for value in values:
        scope = None
        for i, part in enumerate(value.split(",")):
            part = part.strip().lower()
            if i == 0 and ":" in part and part.split(":", 1)[0].strip() not in _PARAMETRIC:
                scope, part = (s.strip() for s in part.split(":", 1))
            if scope not in (None, token.lower()):
                continue
            if part in wanted or (part == "none" and "noindex" in wanted):
                return part
    return None


class Fetcher:
    """One connection pool per host; thread-safe: a download process shares one Fetcher."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self._pools = urllib3.PoolManager(num_pools=256, maxsize=policy.per_host_connections, block=False,
                                          retries=False, headers={"User-Agent": policy.user_agent,
                                                                  "Accept-Encoding": "identity"})
        self._pools.pool_classes_by_scheme = _pool_classes(policy.allow_private_networks)
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            slot = self._hosts.get(host)
            if slot is None:
                slot = self._hosts[host] = threading.BoundedSemaphore(self.policy.per_host_connections)
            return slot

    def fetch(self, url: str) -> bytes:
        """The body of `url` after redirects; raises FetchFailed with the reason."""
        host = _check_url(url)
        with self._slot(host):
            start = time.monotonic()
            return self._follow(url, start)

    def _follow(self, url: str, start: float) -> bytes:
        p = self.policy
        seen = 0
        while True:
            _check_url(url)
            left = p.deadline - (time.monotonic() - start)
            if left <= 0:
                raise FetchFailed("timeout", f"no response within {p.deadline} s")
            try:
                response = self._pools.request("GET", url, redirect=False, retries=False, preload_content=False,
                                               decode_content=False,
                                               timeout=Timeout(connect=min(p.timeout, left), read=min(p.timeout, left)))
            except Exception as exc:  # noqa: BLE001 - every transport failure becomes a reason
                raise _failure(exc) from None
            done = False
            try:
                if response.status in REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchFailed("bad_redirect", f"HTTP {response.status} without Location")
                    seen += 1
                    if seen > p.max_redirects:
                        raise FetchFailed("too_many_redirects", f"more than {p.max_redirects} redirects")
                    url = urljoin(url, location)
                    continue
                if response.status != 200:
                    raise FetchFailed(f"http_{response.status}", response.reason or "")
                if p.respect_opt_out:
                    directive = opt_out(response.headers.getlist("X-Robots-Tag"), p.opt_out_directives,
                                        p.user_agent_token)
                    if directive:
                        raise FetchFailed("opted_out", f"X-Robots-Tag: {directive}")
                body = self._body(response, start)
                done = True
                return body
            finally:
                if not done:  # an unread body (error page, redirect, cut-off read): drop the connection
                    response.close()
                response.release_conn()

    def _body(self, response, start: float) -> bytes:
        p = self.policy
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > p.max_bytes:
            raise FetchFailed("too_large", f"Content-Length {length} > {p.max_bytes} bytes")
        chunks, size = [], 0
        try:
            while True:
                # read1: what has arrived (up to 64 KiB), not "until 64 KiB or the end": a server
                # dripping a byte at a time cannot hold one read past the read timeout, and the
                # deadline is checked between reads.
                chunk = response.read1(64 * 1024)
                if not chunk:
                    break
                size += len(chunk)
                if size > p.max_bytes:
                    raise FetchFailed("too_large", f"body exceeds {p.max_bytes} bytes")
                if time.monotonic() - start > p.deadline:
                    raise FetchFailed("timeout", f"body not complete within {p.deadline} s")
                chunks.append(chunk)
        except FetchFailed:
            raise
        except ProtocolError as exc:  # the connection closed before Content-Length bytes came
            if length and length.isdigit():
                raise FetchFailed("incomplete_body", f"{size} of {length} bytes") from None
            raise _failure(exc) from None
        except Exception as exc:  # noqa: BLE001
            raise _failure(exc) from None
        if length and length.isdigit() and size != int(length):
            raise FetchFailed("incomplete_body", f"{size} of {length} bytes")
        return b"".join(chunks)


def _check_url(url: object) -> str:
    if not isinstance(url, str) or not url.strip():
        raise FetchFailed("missing_url", "no url")
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise FetchFailed("invalid_url", str(exc)[:200]) from None
    if parts.scheme not in ("http", "https"):
        raise FetchFailed("unsupported_scheme", f"scheme {parts.scheme!r}")
    if not host:
        raise FetchFailed("invalid_url", f"no host in {url[:200]!r}")
    return host


def _failure(exc: BaseException) -> FetchFailed:
    """A transport exception as a download reason."""
    cause = exc
    while cause is not None and not isinstance(cause, BlockedAddress):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return FetchFailed("private_address", str(cause))
    text = str(exc)[:300]
    # urllib3's NewConnectionError (refused, unreachable) and NameResolutionError subclass its
    # ConnectTimeoutError: test them first, or a refused connection reads as a timeout.
    if isinstance(exc, NameResolutionError):
        return FetchFailed("dns_error", text)
    if isinstance(exc, NewConnectionError):
        return FetchFailed("connection_error", text)
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError, socket.timeout, TimeoutError)):
        return FetchFailed("timeout", text)
    if isinstance(exc, SSLError):
        return FetchFailed("tls_error", text)
    if isinstance(exc, LocationParseError):
        return FetchFailed("invalid_url", text)
    if isinstance(exc, (NewConnectionError, ProtocolError, HTTPError, OSError)):
        return FetchFailed("connection_error", text)
    return FetchFailed("download_error", f"{type(exc).__name__}: {text}")
