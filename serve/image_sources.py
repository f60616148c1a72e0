"""Where the HTTP API may read an image from, beyond data URIs: a file under one server folder, or a public URL.

Both are off unless the server's operator turns them on (``--allow-local-files ROOT``, ``--allow-remote-urls``),
and both are built so that a client cannot use the server to reach what only the server can reach:

- **Local files** (:func:`read_local_file`): the path (or ``file://`` URL) is resolved with every symlink followed
  and must then lie under the resolved root; the last component is opened with ``O_NOFOLLOW`` and must be a regular
  file. A missing file, a file outside the root, a folder, a device and an unreadable file all get the same message,
  so answers do not reveal what exists outside the root.
- **Remote URLs** (:func:`fetch_url`): the host is resolved once; every address it resolves to must be public (not
  loopback, private, link-local, multicast, reserved, shared, unspecified, or a cloud metadata address such as
  169.254.169.254 or fd00:ec2::254, also when written as an IPv4-mapped / NAT64 / 6to4 IPv6 address). The connection
  goes to that vetted address (so DNS rebinding cannot swap it afterwards) while the ``Host`` header and TLS SNI /
  certificate check use the URL's host name. Redirects are not followed; one deadline covers connecting, the
  headers and the body; the body is streamed and the download stops at the size cap. Environment proxies are not
  used.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from serve import InputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[..., list[tuple[Any, ...]]]

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle instance metadata
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "169.254.170.23",  # AWS EKS pod identity
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure wire server (a public-looking address)
        "192.0.0.192",  # Oracle Cloud metadata
    )
)
"""Cloud metadata endpoints: never fetched, even inside a network the operator allowed."""

BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT / cloud-internal
        "192.0.0.0/24",  # IETF protocol assignments (Python 3.11 counts most of it as global)
        "198.18.0.0/15",
        "64:ff9b:1::/48",  # local-use NAT64
    )
)
"""Networks refused besides what :mod:`ipaddress` flags as non-public."""

_CHUNK = 64 * 1024


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for: IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 (2002::/16)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in ipaddress.ip_network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def refusal(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """Why the server must not connect to ``address`` (``"a loopback address"``, ...), or ``None`` when it may.

    ``allowed`` networks are reachable even when private (an operator's internal image host); cloud metadata
    addresses never are."""
    if isinstance(address, ipaddress.IPv6Address):
        address = ipaddress.ip_address(str(address).split("%", 1)[0])  # drop a zone id ("fe80::1%eth0")
        embedded = _embedded_ipv4(address)  # type: ignore[arg-type]
        if embedded is not None:
            return refusal(embedded, allowed)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if any(address.version == network.version and address in network for network in allowed):
        return None
    checks = (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("non-public", any(address.version == n.version and address in n for n in BLOCKED_NETWORKS)),
        ("non-public", not address.is_global),
    )
    return next((f"a {name} address" for name, flagged in checks if flagged), None)


# ----- remote URLs -------------------------------------------------------------------------------------------------


def _is_address(host: str) -> bool:
    """Whether ``host`` is an IP address literal rather than a name."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _vetted_address(host: str, port: int, allowed: Sequence[IPNetwork], resolver: Resolver) -> str:
    """Resolve ``host`` once and return the address to connect to; every address it resolves to must be allowed
    (a name that also points inside the network is refused rather than filtered)."""
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise InputError(f"cannot resolve the image URL's host {host!r}: {error}") from error
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise InputError(f"the image URL's host {host!r} has no address")
    for address in addresses:
        why = refusal(ipaddress.ip_address(address.split("%", 1)[0]), allowed)
        if why is not None:
            what = f"address {host} is {why}" if _is_address(host) else f"host {host!r} resolves to {why}"
            raise InputError(f"the image URL's {what}; this server fetches images from public addresses only")
    return addresses[0]


def _connection(scheme: str, host: str, port: int, address: str, timeout: float) -> http.client.HTTPConnection:
    """An HTTP(S) connection to ``host`` that connects to the vetted ``address`` instead of resolving ``host``
    again; ``Host``, SNI and the certificate check still use ``host``."""
    if scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)

    def connect_to_vetted(_: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        return socket.create_connection((address, port), *args, **kwargs)

    # http.client's connect() opens its socket through this attribute (HTTPSConnection then wraps the socket
    # with server_hostname=host), so replacing it pins the address for both schemes.
    connection._create_connection = connect_to_vetted  # type: ignore[attr-defined]
    return connection


def _deadline_watch(connection: http.client.HTTPConnection, seconds: float) -> threading.Timer:
    """A started timer that shuts the connection's socket down at the deadline, so a server that trickles bytes
    cannot keep a download alive past it (a socket timeout only bounds each single read)."""

    def expire() -> None:
        if connection.sock is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(max(seconds, 0.0), expire)
    timer.daemon = True
    timer.start()
    return timer


def _read_body(response: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes:
    length = response.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise InputError(f"the image at the URL is {int(length)} bytes; at most {max_bytes} are accepted")
    parts, size = [], 0
    while True:
        if time.monotonic() >= deadline:
            raise TimeoutError
        piece = response.read1(_CHUNK)
        if not piece:
            if time.monotonic() >= deadline:  # the deadline watch closed the socket: a cut-off body
                raise TimeoutError
            return b"".join(parts)
        size += len(piece)
        if size > max_bytes:
            raise InputError(f"the image at the URL is larger than {max_bytes} bytes")
        parts.append(piece)


def fetch_url(
    url: str,
    max_bytes: int,
    timeout_s: float = 10.0,
    allowed: Sequence[IPNetwork] = (),
    resolver: Resolver = socket.getaddrinfo,
) -> bytes:
    """The body of an ``http(s)`` ``url``, fetched under the rules of the module docstring: a public (or
    ``allowed``) address only, no redirects, at most ``max_bytes``, all within ``timeout_s`` seconds.
    Raises :class:`~serve.InputError` with a message for the client."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"not an http(s) URL with a host: {url[:200]!r}")
    if parts.username is not None or parts.password is not None:
        raise InputError("credentials in image URLs are not accepted")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as error:
        raise InputError(f"the image URL has a bad port: {error}") from error
    deadline = time.monotonic() + timeout_s
    address = _vetted_address(parts.hostname, port, allowed, resolver)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    connection = _connection(scheme, parts.hostname, port, address, max(deadline - time.monotonic(), 0.001))
    watch = _deadline_watch(connection, deadline - time.monotonic())
    try:
        connection.request("GET", target, headers={"Accept": "image/*", "User-Agent": "cloc-llava-server"})
        response = connection.getresponse()
        if 300 <= response.status < 400:
            location = response.getheader("Location", "")
            raise InputError(
                f"the image URL answered {response.status} (a redirect to {location[:200]!r}); redirects are not "
                "followed: send the final URL"
            )
        if response.status != 200:
            raise InputError(f"the image URL answered HTTP {response.status} {response.reason}")
        return _read_body(response, max_bytes, deadline)
    except (OSError, http.client.HTTPException) as error:
        if time.monotonic() >= deadline or isinstance(error, TimeoutError):
            raise InputError(f"fetching the image URL took longer than {timeout_s:g} s") from error
        raise InputError(f"could not fetch the image URL: {error or type(error).__name__}") from error
    finally:
        watch.cancel()
        connection.close()


# ----- local files -------------------------------------------------------------------------------------------------


def _local_path(spec: str) -> Path:
    """The path a ``file://`` URL or a plain path names (a ``file://`` URL's host must be empty or localhost)."""
    if not spec.lower().startswith("file:"):
        return Path(spec)
    parts = urllib.parse.urlsplit(spec)
    if parts.netloc not in ("", "localhost"):
        raise ValueError("a file URL with a host")
    return Path(urllib.request.url2pathname(parts.path))


def read_local_file(spec: str, root: Path, max_bytes: int) -> bytes:
    """The bytes of the file ``spec`` names (a path, absolute or relative to ``root``, or a ``file://`` URL), which
    must resolve (symlinks followed) to a regular file under ``root`` (itself already resolved). Every way of not
    being such a file raises the same :class:`~serve.InputError`, which names only what the client sent."""
    not_found = InputError(f"no image file {spec[:300]!r} under the server's image folder")
    try:
        given = _local_path(spec)
        resolved = (given if given.is_absolute() else root / given).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise not_found from None
    if not resolved.is_relative_to(root):
        raise not_found
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(resolved, flags)
    except OSError:
        raise not_found from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO, a device
        os.close(descriptor)
        raise not_found
    with open(descriptor, "rb") as handle:
        if info.st_size > max_bytes:
            raise InputError(f"the image file {spec[:300]!r} is larger than {max_bytes} bytes")
        try:
            return handle.read(max_bytes + 1)
        except OSError:
            raise not_found from None


__all__ = ["BLOCKED_NETWORKS", "METADATA_ADDRESSES", "fetch_url", "read_local_file", "refusal"]
