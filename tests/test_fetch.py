"""Remote images (edgemm.serve.fetch): resolved once, public addresses only, connected to the address that was
checked, redirects re-checked hop by hop, bounded in size and time.

A local http server on 127.0.0.1 (a free port) stands in for the internet. The resolver is monkeypatched: the test
host names answer what each test means them to, and a connection to the stand-in public address PUBLIC reaches the
local server (a connection to 127.0.0.1 reaches it too: that is what a steered fetch would do). `Net.connected`
lists the addresses really connected to.
"""
from __future__ import annotations

import importlib.util
import io
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from edgemm.serve import fetch
from edgemm.serve.api import APIError, Limits
from edgemm.serve.images import fetch_image
from tests.conftest import requires_demo

PUBLIC = "93.184.216.34"           # a public address the test network routes to the local server
SLOW_SECONDS = 6.0                 # how long the slow routes trickle (bounded: the server stops then)


def _png() -> bytes:
    from PIL import Image
    b = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(b, "PNG")
    return b.getvalue()


PNG = _png()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k == "Content-Length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def trickle(self, head_first: bool):
        """One byte every 0.1 s for SLOW_SECONDS, of the body (head_first) or of the headers."""
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        if head_first:
            self.wfile.write(b"Content-Type: image/png\r\nConnection: close\r\n\r\n")
        t_end = time.monotonic() + SLOW_SECONDS
        try:
            while time.monotonic() < t_end:
                self.wfile.write(b"x" if head_first else b"X")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:                             # the client gave up
            return
        self.close_connection = True

    def do_GET(self):
        u = urlparse(self.path)
        self.server.hits.append((u.path, self.headers.get("Host")))
        if u.path == "/img":
            self.send(200, PNG, [("Content-Type", "image/png")])
        elif u.path == "/to":                       # a redirect to ?u=URL
            self.send(302, headers=[("Location", parse_qs(u.query)["u"][0])])
        elif u.path.startswith("/hop/"):            # /hop/N: N redirects, then the image
            n = int(u.path.rsplit("/", 1)[1])
            if n:
                self.send(302, headers=[("Location", f"/hop/{n - 1}")])
            else:
                self.send(200, PNG)
        elif u.path == "/big":                      # declared too large
            self.send(200, b"\0" * 5000)
        elif u.path == "/big-undeclared":           # too large, no Content-Length
            self.close_connection = True
            self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"\0" * 5000)
        elif u.path == "/slow":
            self.trickle(head_first=True)
        elif u.path == "/slow-head":
            self.trickle(head_first=False)
        else:                                       # /secret and the rest: what must never be reached
            self.send(200, b"internal")


class Site:
    """The local http(s) server, in a thread; `hits`: (path, Host header) of each request."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.hits = self.hits = []
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def site():
    s = Site()
    yield s
    s.close()


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


class Net:
    """The monkeypatched resolver and connector. answers[host]: one list of addresses per lookup (the last one
    repeats); `asked`: the names looked up; `connected`: the addresses connected to."""

    def __init__(self, monkeypatch):
        self.answers, self.asked, self.connected = {}, [], []
        self.real_gai, self.real_connect = socket.getaddrinfo, socket.create_connection
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", self.create_connection)

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        if host not in self.answers:
            return self.real_gai(host, port, family, type, proto, flags)
        self.asked.append(host)
        seq = self.answers[host]
        ips = seq.pop(0) if len(seq) > 1 else seq[0]
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port or 0))
                for ip in ips]

    def create_connection(self, address, timeout=None, source_address=None, **kw):
        host, port = address[:2]
        ip = host if _is_ip(host) else self.getaddrinfo(host, port)[0][4][0]   # a client that resolves again
        self.connected.append(ip)
        if ip in (PUBLIC, "127.0.0.1"):
            return self.real_connect(("127.0.0.1", port), timeout)
        raise ConnectionRefusedError(f"the test network does not reach {ip}")


@pytest.fixture
def net(monkeypatch):
    n = Net(monkeypatch)
    n.answers.update({"img.test": [[PUBLIC]], "other.test": [[PUBLIC]]})
    return n


def _limits(*hosts, **kw) -> Limits:
    return Limits(remote_hosts=("img.test", *hosts), **kw)


def _refused(url, limits, code="invalid_image_url") -> APIError:
    with pytest.raises(APIError) as e:
        fetch_image(url, limits)
    assert e.value.status == 400 and e.value.code == code and "\n" not in e.value.message, e.value.message
    return e.value


def test_an_allowed_public_host_is_fetched_with_its_host_header(site, net):
    assert fetch_image(f"http://img.test:{site.port}/img", _limits()) == PNG
    assert net.connected == [PUBLIC] and net.asked == ["img.test"]
    assert site.hits == [("/img", f"img.test:{site.port}")]


@pytest.mark.parametrize("target", ["127.0.0.1", "internal.test"])
def test_a_redirect_to_loopback_is_refused(site, net, target):
    net.answers["internal.test"] = [["127.0.0.1"]]
    url = f"http://img.test:{site.port}/to?u=http://{target}:{site.port}/secret"
    _refused(url, _limits("127.0.0.1", "internal.test"))
    assert [p for p, _ in site.hits] == ["/to"] and "127.0.0.1" not in net.connected


@pytest.mark.parametrize("target", ["169.254.169.254", "meta.test"])
def test_a_redirect_to_link_local_is_refused(site, net, target):
    net.answers["meta.test"] = [["169.254.169.254"]]
    url = f"http://img.test:{site.port}/to?u=http://{target}/latest/meta-data/"
    _refused(url, _limits("169.254.169.254", "meta.test"))
    assert net.connected == [PUBLIC]


def test_a_redirect_to_a_host_not_allowed_is_refused(site, net):
    _refused(f"http://img.test:{site.port}/to?u=http://other.test:{site.port}/img", _limits())
    assert [p for p, _ in site.hits] == ["/to"]


@pytest.mark.parametrize("path", ["/caf\u00e9.png", "/a b"])
def test_a_url_http_cannot_send_is_refused_in_shape(site, net, path):
    _refused(f"http://img.test:{site.port}{path}", _limits())


def test_redirects_are_followed_up_to_the_hop_limit(site, net):
    assert fetch_image(f"http://img.test:{site.port}/hop/{fetch.MAX_REDIRECTS}", _limits()) == PNG
    site.hits.clear()
    assert "redirects" in _refused(f"http://img.test:{site.port}/hop/{fetch.MAX_REDIRECTS + 1}", _limits()).message
    assert len(site.hits) == fetch.MAX_REDIRECTS + 1


def test_dns_rebinding_cannot_move_the_connection(site, net):
    """The name answers a public address first and 127.0.0.1 after: the fetch connects where it checked."""
    net.answers["img.test"] = [[PUBLIC], ["127.0.0.1"]]
    fetch_image(f"http://img.test:{site.port}/img", _limits())
    assert "127.0.0.1" not in net.connected and net.connected == [PUBLIC]
    assert net.asked == ["img.test"]                                  # resolved once


@pytest.mark.parametrize("address", ["::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::7f00:1",
                                     "2002:7f00:1::", "::1", "100.64.0.1", "0.0.0.0", "224.0.0.1"])
def test_non_public_forms_are_refused_before_any_connection(site, net, address):
    net.answers["img.test"] = [[address]]
    _refused(f"http://img.test:{site.port}/img", _limits())
    assert net.connected == [] and site.hits == []


def test_one_non_public_answer_among_public_ones_refuses_the_host(site, net):
    net.answers["img.test"] = [[PUBLIC, "10.0.0.7"]]
    _refused(f"http://img.test:{site.port}/img", _limits())
    assert net.connected == []


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True), ("64:ff9b::808:808", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("100.127.255.254", False), ("0.0.0.0", False),
    ("224.0.0.1", False), ("239.255.255.250", False), ("240.0.0.1", False), ("255.255.255.255", False),
    ("::", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("fec0::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:100.64.0.1", False),
    ("64:ff9b::7f00:1", False), ("64:ff9b::a9fe:a9fe", False), ("64:ff9b:1::808:808", False),
    ("2002:7f00:1::", False), ("2002:a00:1::", False), ("2001:db8::1", False)])
def test_address_checker(address, public):
    assert (fetch.address_refusal(address) is None) == public, fetch.address_refusal(address)


def test_an_oversized_body_is_refused(site, net):
    _refused(f"http://img.test:{site.port}/big", _limits(remote_bytes=1000), code="image_too_large")
    _refused(f"http://img.test:{site.port}/big-undeclared", _limits(remote_bytes=1000), code="image_too_large")


@pytest.mark.parametrize("path", ["/slow", "/slow-head"])
def test_a_slow_body_or_header_is_refused_within_the_time_limit(site, net, path):
    t0 = time.monotonic()
    e = _refused(f"http://img.test:{site.port}{path}", _limits(remote_seconds=1.0))
    took = time.monotonic() - t0
    assert 0.9 <= took < 2.5 < SLOW_SECONDS, took
    assert "within" in e.message


@pytest.fixture
def tls_site(tmp_path, monkeypatch):
    """An https server whose certificate names img.test only; the fetcher trusts that certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=img.test",
                    "-addext", "subjectAltName=DNS:img.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    names = []
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)
    monkeypatch.setattr(fetch, "tls_context", lambda: ssl.create_default_context(cafile=str(cert)))
    s = Site(server_ctx)
    s.sni = names
    yield s
    s.close()


def test_https_connects_to_the_checked_address_and_checks_the_certificate_against_the_name(tls_site, net):
    assert fetch_image(f"https://img.test:{tls_site.port}/img", _limits()) == PNG
    assert net.connected == [PUBLIC] and tls_site.sni == ["img.test"]
    assert tls_site.hits == [("/img", f"img.test:{tls_site.port}")]
    e = _refused(f"https://other.test:{tls_site.port}/img", _limits("other.test"))    # the cert names img.test
    assert "certificate" in e.message.lower()


@requires_demo
@pytest.mark.skipif(importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("openai") is None,
                    reason="needs the serve and test extras")
def test_the_server_refuses_a_loopback_image_in_openai_shape(site):
    """End to end: `edgemm serve --allow-remote-images 127.0.0.1` still refuses 127.0.0.1 (400, one line)."""
    from tests.test_serve import Server, _body, _msg
    s = Server("--allow-remote-images", "127.0.0.1")
    try:
        code, out, _ = s.request("POST", "/v1/chat/completions",
                                 _body([_msg("hi", f"http://127.0.0.1:{site.port}/secret")]))
    finally:
        s.stop()
    err = json.loads(out)["error"]
    assert code == 400 and err["code"] == "invalid_image_url" and err["type"] == "invalid_request_error"
    assert "non-public" in err["message"] and "\n" not in err["message"] and site.hits == []
