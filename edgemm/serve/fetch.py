"""Remote images that cannot be steered (`edgemm serve --allow-remote-images HOST`).

An http(s) URL's host must be one the server allows. It is resolved once; every address it resolves to must be
public (not loopback, private, link-local, shared 100.64/10, multicast, reserved or unspecified, nor the
IPv4-mapped, NAT64 or 6to4 form of such an address), and the connection goes to an address that was checked: the
Host header and, over https, the TLS server name and certificate check keep the host name. A redirect is a new URL
that passes the same checks, at most MAX_REDIRECTS of them. One deadline (Limits.remote_seconds) bounds the whole
fetch, every hop, headers and body (a socket still waiting at the deadline is shut down), and the body stops at
Limits.remote_bytes. Every refusal is an APIError 400 with a one-line message.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from urllib.parse import urljoin, urlparse

from .api import APIError, Limits

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
SHARED = ipaddress.ip_network("100.64.0.0/10")          # carrier-grade NAT (RFC 6598)
NAT64 = ipaddress.ip_network("64:ff9b::/96")            # the well-known prefix: an IPv4 address in the low 32 bits
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")    # local-use translation (RFC 8215)


def _bad_url(message: str) -> APIError:
    return APIError(400, message, code="invalid_image_url")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::a.b.c.d), 6to4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def address_refusal(ip) -> str | None:
    """Why an address is not public (None: it is)."""
    ip = ipaddress.ip_address(ip)
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = embedded_ipv4(ip)
        if v4 is not None:
            why = address_refusal(v4)
            return f"{why} ({ip.compressed} is {v4})" if why else None
        if ip in NAT64_LOCAL or ip.is_site_local:
            return "not public"
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if isinstance(ip, ipaddress.IPv4Address) and ip in SHARED:
        return "shared (100.64.0.0/10)"
    return None if ip.is_global else "not public"


def resolve(host: str, port: int) -> list[str]:
    """The host's addresses, resolved once; refused unless every one of them is public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise _bad_url(f"cannot resolve the image host {host}") from None
    ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not ips or any(address_refusal(ip) for ip in ips):
        raise _bad_url(f"image host {host} resolves to a non-public address; refused")
    return ips


def open_socket(ips: list[str], port: int, timeout: float) -> socket.socket:
    """A TCP connection to the first of the checked addresses that answers (never a name resolved again)."""
    err: OSError | None = None
    for ip in ips:
        try:
            return socket.create_connection((ip, port), timeout)
        except OSError as e:
            err = e
    raise err or OSError("no address to connect to")


class PinnedHTTP(http.client.HTTPConnection):
    """http to the checked addresses; the Host header names the host."""

    def __init__(self, host: str, port: int, ips: list[str], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ips, self.raw = ips, None

    def connect(self):
        self.sock = self.raw = open_socket(self.ips, self.port, self.timeout)


def tls_context() -> ssl.SSLContext:
    """The system's trusted certificates, host names checked."""
    return ssl.create_default_context()


class PinnedHTTPS(PinnedHTTP):
    """https to the checked addresses; TLS sends the host name (SNI) and checks the certificate against it."""

    def connect(self):
        sock = open_socket(self.ips, self.port, self.timeout)
        self.sock = self.raw = tls_context().wrap_socket(sock, server_hostname=self.host)


class Deadline:
    """One time limit over a whole fetch; `watch(conn)` shuts the connection's socket down when it passes."""

    def __init__(self, seconds: float):
        self.seconds, self.at, self.passed = seconds, time.monotonic() + seconds, False

    def error(self) -> APIError:
        return _bad_url(f"the remote image did not arrive within {self.seconds:g} s")

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.error()
        return left

    def watch(self, conn: PinnedHTTP) -> threading.Timer:
        def stop():
            self.passed = True
            if conn.raw is not None:
                try:
                    conn.raw.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        t = threading.Timer(self.left(), stop)
        t.daemon = True
        t.start()
        return t


def checked_url(url: str, limits: Limits):
    """-> (parsed url, port) when the URL is http(s) on an allowed host."""
    u = urlparse(url)
    if u.scheme not in ("http", "https"):
        raise _bad_url("image_url must be a data: URI (or http(s) where the server allows it)")
    if not limits.remote_hosts or u.hostname not in limits.remote_hosts:
        raise _bad_url("remote image URLs are refused by this server (start it with --allow-remote-images HOST to "
                       "allow a host); send the image as a data: URI")
    try:
        return u, u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        raise _bad_url("the image URL's port is not a number") from None


def read_body(r: http.client.HTTPResponse, limits: Limits) -> bytes:
    declared = r.getheader("Content-Length", "")
    if declared.isdigit() and int(declared) > limits.remote_bytes:
        raise APIError(400, "the remote image is larger than this server accepts", code="image_too_large")
    data = bytearray()
    while chunk := r.read1(65536):
        data += chunk
        if len(data) > limits.remote_bytes:
            raise APIError(400, "the remote image is larger than this server accepts", code="image_too_large")
    return bytes(data)


def get_once(url: str, limits: Limits, deadline: Deadline) -> tuple[int, str | None, bytes]:
    """One request, no redirect followed: -> (status, Location, body of a 200)."""
    u, port = checked_url(url, limits)
    ips = resolve(u.hostname, port)
    conn = (PinnedHTTPS if u.scheme == "https" else PinnedHTTP)(u.hostname, port, ips, deadline.left())
    timer = deadline.watch(conn)
    try:
        conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""),
                     headers={"User-Agent": "edgemm", "Connection": "close"})
        r = conn.getresponse()
        if r.status in REDIRECTS:
            return r.status, r.getheader("Location"), b""
        if r.status != 200:
            raise _bad_url(f"cannot fetch the image: HTTP {r.status} {r.reason}")
        data = read_body(r, limits)
        if deadline.passed:
            raise deadline.error()
        return r.status, None, data
    except (OSError, http.client.HTTPException, ValueError) as e:     # ValueError: a URL http.client refuses
        if deadline.passed or isinstance(e, TimeoutError):
            raise deadline.error() from None
        raise _bad_url(f"cannot fetch the image: {' '.join(str(e).split()) or type(e).__name__}") from None
    finally:
        timer.cancel()
        conn.close()


def fetch_remote(url: str, limits: Limits) -> bytes:
    """The image at an http(s) URL, each redirect checked as the first URL, within the size and time limits."""
    deadline = Deadline(limits.remote_seconds)
    for _ in range(MAX_REDIRECTS + 1):
        status, location, data = get_once(url, limits, deadline)
        if status not in REDIRECTS:
            return data
        if not location:
            raise _bad_url(f"cannot fetch the image: HTTP {status} without a Location")
        url = urljoin(url, location)
    raise _bad_url(f"the image URL redirects more than {MAX_REDIRECTS} times; refused")
