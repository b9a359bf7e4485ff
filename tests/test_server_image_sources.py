"""Image URLs: data: URIs, and the SSRF guards of remote fetching (against a loopback HTTP server).

Only loopback networking is available, so the "public address" rule is swapped for one that allows
127.0.0.1 alone where a fetch must succeed; the default rule is tested on its own.
"""

from __future__ import annotations

import base64
import http.server
import socket
import threading
import time

import pytest

from paligemma.server import image_sources
from paligemma.server.image_sources import FetchLimits, ImageSourceError, is_public_address, read_image_url

REMOTE = FetchLimits(allow_remote=True, max_bytes=1000, timeout_s=2.0)


def only_127_0_0_1(address: str) -> bool:
    return address == "127.0.0.1"


@pytest.fixture(scope="module")
def site():
    """A loopback HTTP server: /ok (10 bytes), /big, /chunked-big, /slow, /redirect-*, /missing."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            port = self.server.server_address[1]
            if self.path == "/ok":
                self._send(200, b"0123456789")
            elif self.path == "/big":
                self._send(200, b"x" * 5000)
            elif self.path == "/chunked-big":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(20):
                    self.wfile.write(b"64\r\n" + b"y" * 100 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            elif self.path == "/slow":
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                try:
                    for _ in range(100):  # a byte every 0.1 s: each read is quick, the whole is too slow
                        self.wfile.write(b"z")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass
            elif self.path == "/redirect-ok":
                self._redirect(f"http://127.0.0.1:{port}/ok")
            elif self.path == "/redirect-private":
                self._redirect(f"http://127.0.0.2:{port}/ok")
            elif self.path == "/redirect-loop":
                self._redirect("/redirect-loop")
            else:
                self._send(404, b"no")

        def _send(self, status, body):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _redirect(self, location):
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _code(url, limits=REMOTE, allowed=is_public_address) -> str:
    with pytest.raises(ImageSourceError) as caught:
        read_image_url(url, limits, allowed)
    return caught.value.code


def test_data_uris():
    assert read_image_url("data:image/png;base64," + base64.b64encode(b"\x89PNG..").decode(), FetchLimits()) == \
        b"\x89PNG.."
    assert read_image_url("data:;base64,aGV\nsbG8=", FetchLimits()) == b"hello"  # line breaks are allowed
    assert read_image_url("data:text/plain,hi%21", FetchLimits()) == b"hi!"
    assert _code("data:image/png;base64,not*base64") == "invalid_base64"
    assert _code("data:image/png;base64,") == "invalid_image"
    assert _code("data:image/png;base64") == "invalid_image_url"
    big = "data:;base64," + base64.b64encode(b"x" * 2000).decode()
    assert _code(big, FetchLimits(max_bytes=1000)) == "image_too_large"


def test_remote_urls_are_refused_unless_allowed_and_other_schemes_always():
    assert _code("https://example.com/cat.png", FetchLimits()) == "remote_images_disabled"
    for url in ("file:///etc/passwd", "ftp://example.com/a.png", "gopher://x", "/etc/passwd", ""):
        assert _code(url) == "invalid_image_url"


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("127.1.2.3", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("0.0.0.0", False), ("100.64.0.1", False), ("224.0.0.1", False), ("255.255.255.255", False), ("::1", False),
    ("fe80::1%eth0", False), ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
    ("::", False),
])
def test_public_address_rule(address, public):
    assert is_public_address(address) is public


@pytest.mark.parametrize("url", ["http://127.0.0.1/x.png", "http://localhost:8000/x.png", "http://[::1]/x.png",
                                 "https://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/",
                                 "http://0.0.0.0/", "http://2130706433/x.png", "http://0x7f.1/x.png"])
def test_private_and_loopback_hosts_are_refused_before_connecting(url):
    assert _code(url) == "image_url_forbidden"


def test_every_resolved_address_is_checked(monkeypatch):
    def two_answers(host, port, *args, **kwargs):  # one public, one private: must be refused
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("93.184.215.14", "10.0.0.7")]

    monkeypatch.setattr(image_sources.socket, "getaddrinfo", two_answers)
    assert _code("http://rebinding.example/x.png") == "image_url_forbidden"


def test_fetching_with_limits(site):
    assert read_image_url(site + "/ok", REMOTE, only_127_0_0_1) == b"0123456789"
    assert read_image_url(site + "/redirect-ok", REMOTE, only_127_0_0_1) == b"0123456789"
    assert _code(site + "/big", allowed=only_127_0_0_1) == "image_too_large"
    assert _code(site + "/chunked-big", allowed=only_127_0_0_1) == "image_too_large"
    assert _code(site + "/missing", allowed=only_127_0_0_1) == "image_fetch_failed"
    assert _code(site + "/redirect-loop", allowed=only_127_0_0_1) == "image_fetch_failed"
    assert _code(site + "/redirect-private", allowed=only_127_0_0_1) == "image_url_forbidden"
    start = time.monotonic()
    assert _code(site + "/slow", FetchLimits(allow_remote=True, timeout_s=0.5), only_127_0_0_1) == \
        "image_fetch_failed"
    assert time.monotonic() - start < 2.0
