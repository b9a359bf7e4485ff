"""Image URLs from requests -> image bytes: `data:` URIs always, http(s) only when allowed.

Remote fetching is off by default. When it is on, a fetch must not become a way into the
server's own network (SSRF), so:

- the host name is resolved and EVERY address it resolves to must be public (not private,
  loopback, link-local, site-local, multicast, reserved or unspecified); an IPv6 address that
  carries an IPv4 one (IPv4-mapped, NAT64 64:ff9b::/96) is judged by that IPv4 address, and 6to4
  (2002::/16, which can wrap 127.0.0.1) and local-use NAT64 (64:ff9b:1::/48) are refused whole;
- the connection goes to the address that was checked (pinned), so a second DNS answer cannot
  swap in a private one; HTTPS still verifies the certificate for the host name;
- redirects are followed by hand (at most `MAX_REDIRECTS`), each target checked the same way;
- the body is read with a byte limit and an overall deadline, not just a per-read timeout.

Everything here is blocking; the server calls it from a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

from ..errors import PaliGemmaError

MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix: the last 32 bits are an IPv4 address
# Python's is_global lets these through: 6to4 (relays to the embedded IPv4, 127.0.0.1 included),
# deprecated site-local, and local-use NAT64 (translates to any IPv4 address, private ones included).
_NOT_PUBLIC_V6 = tuple(ipaddress.ip_network(net) for net in ("2002::/16", "fec0::/10", "64:ff9b:1::/48"))


class ImageSourceError(PaliGemmaError, ValueError):
    """The image URL is unusable; `code` is a short machine-readable reason."""

    def __init__(self, message: str, code: str = "invalid_image_url"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FetchLimits:
    allow_remote: bool = False
    max_bytes: int = 20 * 1024 * 1024  # encoded image size, data: URIs included
    timeout_s: float = 10.0  # whole fetch, redirects included


def is_public_address(address: str) -> bool:
    """True when `address` (IPv4 or IPv6 text) is globally routable, i.e. safe to fetch from."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif any(ip in net for net in _NOT_PUBLIC_V6):
            return False
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def read_image_url(url: str, limits: FetchLimits,
                   address_allowed: Callable[[str], bool] = is_public_address) -> bytes:
    """The bytes behind an image URL (`data:` or, if allowed, http/https). Raises ImageSourceError."""
    if not isinstance(url, str) or not url:
        raise ImageSourceError("image_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_uri(url, limits.max_bytes)
    if scheme in ("http", "https"):
        if not limits.allow_remote:
            raise ImageSourceError("remote image URLs are disabled on this server: send the image as a data: URI "
                                   "(base64), or start the server with --allow-remote-images", "remote_images_disabled")
        return fetch_remote(url, limits, address_allowed)
    raise ImageSourceError(f"unsupported image URL scheme {scheme or url[:20]!r}: use a data: URI "
                           "(data:image/png;base64,...) or an http(s) URL")


def decode_data_uri(url: str, max_bytes: int) -> bytes:
    """Decode `data:[<mediatype>][;base64],<data>`; base64 must be strictly valid."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageSourceError("malformed data: URI (no ',' before the data)")
    # base64 grows data by 4/3: refuse oversized payloads before decoding them.
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageSourceError(f"image is larger than the {max_bytes} byte limit", "image_too_large")
    if header.lower().split(";")[-1] == "base64":
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageSourceError("the data: URI's base64 payload is not valid base64", "invalid_base64") from None
    else:
        data = unquote_to_bytes(payload)
    if not data:
        raise ImageSourceError("the data: URI holds no data", "invalid_image")
    if len(data) > max_bytes:
        raise ImageSourceError(f"image is larger than the {max_bytes} byte limit", "image_too_large")
    return data


def fetch_remote(url: str, limits: FetchLimits, address_allowed: Callable[[str], bool] = is_public_address) -> bytes:
    """GET `url` with the SSRF rules of the module docstring; returns the body."""
    deadline = time.monotonic() + limits.timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), parts.hostname
        if scheme not in ("http", "https") or not host:
            raise ImageSourceError(f"cannot fetch {url[:100]!r}: only http(s) URLs with a host are fetched")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise ImageSourceError(f"bad port in image URL {url[:100]!r}") from None
        address = _resolve_checked(host, port, address_allowed)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        connection_class = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        connection = connection_class(host, port, address, timeout=_remaining(deadline))
        try:
            connection.request("GET", path, headers={"User-Agent": "paligemma-server", "Accept": "image/*"})
            sock = connection.sock  # getresponse() may hand it to the response and forget it
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise ImageSourceError(f"image URL redirected without a Location ({response.status})")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise ImageSourceError(f"fetching the image URL failed: HTTP {response.status}", "image_fetch_failed")
            return _read_limited(sock, response, limits.max_bytes, deadline)
        except (OSError, http.client.HTTPException) as err:  # socket.timeout and ssl errors are OSErrors
            raise ImageSourceError(f"fetching the image URL failed: {type(err).__name__}: {err}",
                                   "image_fetch_failed") from None
        finally:
            connection.close()
    raise ImageSourceError(f"image URL redirected more than {MAX_REDIRECTS} times", "image_fetch_failed")


def _resolve_checked(host: str, port: int, address_allowed: Callable[[str], bool]) -> str:
    """Resolve `host`; refuse if ANY of its addresses is not allowed; return the first."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ImageSourceError(f"cannot resolve image host {host!r}: {err}", "image_fetch_failed") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise ImageSourceError(f"image host {host!r} has no addresses", "image_fetch_failed")
    for address in addresses:
        if not address_allowed(address):
            raise ImageSourceError(f"image host {host!r} resolves to a non-public address ({address}); refusing "
                                   "to fetch", "image_url_forbidden")
    return addresses[0]


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ImageSourceError("fetching the image URL timed out", "image_fetch_failed")
    return left


def _read_limited(sock: socket.socket, response: http.client.HTTPResponse, max_bytes: int,
                  deadline: float) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise ImageSourceError(f"remote image is larger than the {max_bytes} byte limit", "image_too_large")
    chunks, total = [], 0
    while True:
        # Each read waits at most until the deadline, so a server trickling bytes cannot hold us.
        sock.settimeout(_remaining(deadline))
        chunk = response.read1(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise ImageSourceError(f"remote image is larger than the {max_bytes} byte limit", "image_too_large")
        chunks.append(chunk)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a pre-checked address, with the URL's host in the Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a pre-checked address; SNI and certificate checks use the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
