"""Get an event's image bytes: inline base64, a file under an allowed root, or http(s) behind an SSRF guard.

Every refusal or failure is a ``DeadLetterError`` with a specific code, so a bad event never raises
anything else. The http(s) guard resolves the host itself and connects to the very address it
checked (see ``_PinnedBackend``), so a DNS answer that changes between check and connect (DNS
rebinding) cannot reach an internal address.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import certifi
import httpcore
import httpx

from imgdedup.config import Settings
from imgdedup.errors import DeadLetterError, ErrorCode

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list]

#: IPv4 ranges refused besides what ``ipaddress`` already calls non-global (shared 100.64/10 is
#: non-global there; multicast is "global" in Python 3.11, so it is listed).
_EXTRA_V4 = (ipaddress.ip_network("224.0.0.0/4"), ipaddress.ip_network("100.64.0.0/10"))
#: IPv6 prefixes that carry an IPv4 address a gateway may forward to (NAT64 well-known prefix).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

_REDIRECTS = {301, 302, 303, 307, 308}


def forbidden_reason(addr: IPAddress) -> str | None:
    """Why an address is not a public unicast destination, or None if it is.

    IPv6 forms that embed an IPv4 address (v4-mapped, 6to4, Teredo, NAT64) are judged by that
    IPv4 address too, so ``[::ffff:127.0.0.1]`` is loopback, not "global".
    """
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = [addr.ipv4_mapped, addr.sixtofour, addr.teredo[1] if addr.teredo else None]
        if addr in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        for inner in filter(None, embedded):
            reason = forbidden_reason(inner)
            if reason:
                return f"{reason}, embedded {inner}"
    elif any(addr in net for net in _EXTRA_V4):
        return "multicast" if addr.is_multicast else "shared address space"
    for flag in ("is_loopback", "is_link_local", "is_site_local", "is_multicast", "is_unspecified", "is_reserved",
                 "is_private"):
        if getattr(addr, flag, False):
            return flag[3:].replace("_", "-")
    if not addr.is_global:
        return "not global"
    return None


class AddressPolicy:
    """Which resolved addresses http(s) fetches may connect to.

    A host named in ``http_allow_hosts`` may resolve anywhere; otherwise every resolved address
    must be public or inside an allowed CIDR. One bad address refuses the whole host, because we
    cannot know which one a later connection attempt would use.
    """

    def __init__(self, allow: list[str], resolver: Resolver = socket.getaddrinfo):
        self.resolver = resolver
        self.allowed_names: set[str] = set()
        self.allowed_nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow:
            try:
                self.allowed_nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.allowed_names.add(entry.lower().rstrip("."))

    def resolve(self, host: str, port: int, timeout: float | None = None) -> list[str]:
        """The addresses to connect to for ``host``, all checked; refuses with uri_not_allowed."""
        try:
            infos = _within(timeout, self.resolver, host, port, type=socket.SOCK_STREAM)
        except FutureTimeout:
            raise DeadLetterError(ErrorCode.FETCH_TIMEOUT, f"resolving host {host!r} took over {timeout:.3g} s") from None
        except (socket.gaierror, UnicodeError) as exc:
            raise DeadLetterError(ErrorCode.FETCH_FAILED, f"cannot resolve host {host!r}: {exc}") from None
        addrs = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if not addrs:
            raise DeadLetterError(ErrorCode.FETCH_FAILED, f"host {host!r} resolved to no address")
        if host.lower().rstrip(".") not in self.allowed_names:
            for addr in addrs:
                reason = forbidden_reason(addr)
                if reason and not any(addr in net for net in self.allowed_nets if net.version == addr.version):
                    raise DeadLetterError(
                        ErrorCode.URI_NOT_ALLOWED, f"host {host!r} resolves to {addr} ({reason}); not in http_allow_hosts"
                    )
        return [str(a) for a in addrs]


def _within(timeout: float | None, call: Callable, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` on a daemon thread, waiting at most ``timeout`` seconds for it.

    For getaddrinfo, which has no timeout of its own (the system resolver's retries can take tens of
    seconds): the fetch deadline bounds the wait. A lookup that outlives it keeps its thread until
    the resolver gives up; being a daemon, it never holds up the worker's exit.
    """
    if timeout is None:
        return call(*args, **kwargs)
    answer: Future = Future()

    def run() -> None:
        try:
            answer.set_result(call(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 -- handed to the waiting fetch thread, which decides
            answer.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="imgdedup-dns").start()
    return answer.result(timeout)


class _PinnedBackend(httpcore.SyncBackend):
    """The network backend of our connection pool: resolve, check, then connect to the checked IP.

    httpcore calls ``connect_tcp`` with the URL's host for every new connection (first request,
    redirect to a new host, reconnect after keep-alive expiry); TLS SNI, certificate checks and the
    Host header still use the URL's host, because httpcore takes them from the request origin.
    Resolving here, instead of before the request, leaves no window for a second, different DNS answer.
    """

    def __init__(self, policy: AddressPolicy):
        super().__init__()
        self.policy = policy

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        last: Exception | None = None
        for addr in self.policy.resolve(host, port, timeout):
            try:
                return super().connect_tcp(addr, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:  # try the next checked address
                last = exc
        assert last is not None
        raise last


class _PinnedTransport(httpx.HTTPTransport):
    """httpx's own transport with its pool rebuilt around ``_PinnedBackend``.

    httpx 0.28 has no public parameter for the network backend (encode/httpx PR #3749), so the pool
    is replaced; ``test_fetch`` proves the backend is really the one connecting.
    """

    def __init__(self, policy: AddressPolicy, max_connections: int):
        super().__init__(trust_env=False)
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl.create_default_context(cafile=certifi.where()),
            max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=30.0,
            network_backend=_PinnedBackend(policy),
        )


class Fetcher:
    """Fetches image bytes for events; one per worker, shared by its fetch threads.

    Holds one httpx.Client (connection pooling; thread-safe), created on the first http(s) fetch.
    ``resolver`` is ``socket.getaddrinfo`` unless a test or a custom DNS setup passes another.
    """

    def __init__(self, settings: Settings, *, resolver: Resolver = socket.getaddrinfo):
        self.settings = settings
        self.policy = AddressPolicy(settings.http_allow_hosts, resolver)
        self.roots = [str(Path(r).resolve()) for r in settings.file_roots]
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def fetch(self, image: dict | None) -> bytes:
        """The bytes of an event's ``image`` object, checked against its optional ``sha256``."""
        if not isinstance(image, dict) or ("uri" in image) == ("data" in image):
            raise DeadLetterError(ErrorCode.SCHEMA_VIOLATION, "image must have exactly one of 'uri' or 'data'")
        data = self._data(image["data"]) if "data" in image else self._uri(str(image["uri"]))
        expected = image.get("sha256")
        if expected is not None:
            actual = hashlib.sha256(data).hexdigest()
            if str(expected).lower() != actual:
                raise DeadLetterError(ErrorCode.SHA256_MISMATCH, f"event says sha256 {expected}, bytes have {actual}")
        return data

    # --- sources ---------------------------------------------------------------------------------
    def _data(self, text: Any) -> bytes:
        limit = self.settings.max_image_bytes
        if not isinstance(text, str):
            raise DeadLetterError(ErrorCode.FETCH_FAILED, "image.data must be a base64 string")
        if len(text) > 4 * ((limit + 2) // 3):
            raise DeadLetterError(ErrorCode.TOO_LARGE, f"image.data has {len(text)} base64 chars, over {limit} bytes")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DeadLetterError(ErrorCode.FETCH_FAILED, f"image.data is not valid base64: {exc}") from None
        if len(data) > limit:
            raise DeadLetterError(ErrorCode.TOO_LARGE, f"image.data decodes to {len(data)} bytes, over {limit}")
        return data

    def _uri(self, uri: str) -> bytes:
        scheme = _scheme(uri)
        if scheme == "file":
            return self._file(uri)
        if scheme in ("http", "https"):
            return self._http(uri)
        raise DeadLetterError(ErrorCode.URI_NOT_ALLOWED, f"scheme {scheme or '(none)'!r} not allowed: {uri[:200]}")

    def _file(self, uri: str) -> bytes:
        path = _file_path(uri)
        try:
            return _read_under_roots(path, self.settings.max_image_bytes, self.roots)
        except OSError as exc:  # nothing to read there: say so only for a path inside the roots
            if not _under(str(path.resolve()), self.roots):
                raise DeadLetterError(ErrorCode.URI_NOT_ALLOWED, f"{path} is outside file_roots") from None
            reason = "no such file" if isinstance(exc, FileNotFoundError) else f"cannot open ({exc.strerror})"
            raise DeadLetterError(ErrorCode.FETCH_FAILED, f"{reason}: {path}") from None

    def _http(self, uri: str) -> bytes:
        deadline = time.monotonic() + self.settings.fetch_timeout_s
        url = _http_url(uri)
        for _ in range(self.settings.fetch_max_redirects + 1):
            location = self._get(url, deadline)
            if isinstance(location, bytes):
                return location
            url = _redirect_target(url, location)
        raise DeadLetterError(
            ErrorCode.FETCH_FAILED, f"more than {self.settings.fetch_max_redirects} redirects from {uri[:200]}"
        )

    def _get(self, url: httpx.URL, deadline: float) -> bytes | str:
        """One hop: the body, or the Location of a redirect."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadLetterError(ErrorCode.FETCH_TIMEOUT, f"no time left for {url}")
        try:
            with self.client.stream("GET", url, timeout=remaining, headers={"Accept-Encoding": "identity"}) as resp:
                if resp.status_code in _REDIRECTS:
                    if "location" not in resp.headers:
                        raise DeadLetterError(ErrorCode.FETCH_FAILED, f"HTTP {resp.status_code} without Location")
                    return resp.headers["location"]
                if not 200 <= resp.status_code < 300:
                    raise DeadLetterError(ErrorCode.FETCH_FAILED, f"HTTP {resp.status_code} from {url}")
                return _read_capped(resp, self.settings.max_image_bytes, deadline)
        except httpx.TimeoutException as exc:
            raise DeadLetterError(ErrorCode.FETCH_TIMEOUT, f"{type(exc).__name__} fetching {url}") from None
        except httpx.HTTPError as exc:
            raise DeadLetterError(ErrorCode.FETCH_FAILED, f"{type(exc).__name__} fetching {url}: {exc}") from None

    @property
    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                limit = max(10, self.settings.fetch_threads)
                self._client = httpx.Client(transport=_PinnedTransport(self.policy, limit), follow_redirects=False,
                                            trust_env=False)
            return self._client


def fetch_bytes(image: dict | None, settings: Settings) -> bytes:
    """One-off fetch (opens and closes a Fetcher); workers keep one ``Fetcher`` instead."""
    with Fetcher(settings) as fetcher:
        return fetcher.fetch(image)


def _http_url(text: str) -> httpx.URL:
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as exc:
        raise DeadLetterError(ErrorCode.FETCH_FAILED, f"invalid URL {text[:200]!r}: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise DeadLetterError(ErrorCode.URI_NOT_ALLOWED, f"scheme {url.scheme!r} not allowed: {text[:200]}")
    if not url.host:
        raise DeadLetterError(ErrorCode.FETCH_FAILED, f"URL without host: {text[:200]}")
    return url


def _redirect_target(url: httpx.URL, location: str) -> httpx.URL:
    """The next hop's URL; relative locations resolve against the hop that sent them."""
    try:
        target = str(url.join(location))
    except (httpx.InvalidURL, ValueError) as exc:
        raise DeadLetterError(ErrorCode.FETCH_FAILED, f"invalid redirect Location {location[:200]!r}: {exc}") from None
    return _http_url(target)


def _read_capped(resp: httpx.Response, limit: int, deadline: float) -> bytes:
    """Stream the body, refusing early on Content-Length and as soon as the cap is passed.

    httpx timeouts apply per read, so the whole-fetch deadline is also checked between chunks: a
    server trickling bytes is cut at the first chunk after the deadline.
    """
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise DeadLetterError(ErrorCode.TOO_LARGE, f"Content-Length {length} over max_image_bytes {limit}")
    chunks, size = [], 0
    for chunk in resp.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise DeadLetterError(ErrorCode.TOO_LARGE, f"body passed max_image_bytes {limit}")
        if time.monotonic() > deadline:
            raise DeadLetterError(ErrorCode.FETCH_TIMEOUT, "body still arriving at the fetch deadline")
        chunks.append(chunk)
    return b"".join(chunks)


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].lower() if ":" in uri else ""


def is_network(image: object) -> bool:
    """Whether fetching this event's ``image`` waits on a remote server (http/https), not on local I/O."""
    return isinstance(image, dict) and _scheme(str(image.get("uri", ""))) in ("http", "https")


def _file_path(uri: str) -> Path:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise DeadLetterError(ErrorCode.URI_NOT_ALLOWED, f"file URI with a remote host: {uri[:200]}")
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise DeadLetterError(ErrorCode.URI_NOT_ALLOWED, f"file URI needs an absolute path: {uri[:200]}")
    return Path(path)


def _read_under_roots(path: Path, limit: int, roots: list[str]) -> bytes:
    """Read a regular file of at most ``limit`` bytes whose real path is under one of ``roots``.

    ``O_PATH`` finds the file the way any open would (symlinks and ``..`` followed by the kernel) but
    opens nothing: no device is touched, a FIFO cannot block. The kernel then names what it found
    (``/proc/self/fd``), that name is checked against the roots, and the file is opened through the
    same descriptor, so nothing can be swapped in between. One walk of the path in the kernel, where
    resolving it in Python cost an lstat per component and a GIL hand-over per lstat (Linux only, as
    the worker's containers are). Raises OSError when there is nothing to open; the caller decides
    what to tell.
    """
    location = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        try:
            real = os.readlink(f"/proc/self/fd/{location}")
        except OSError:
            raise DeadLetterError(ErrorCode.INTERNAL_ERROR, "file:// sources need /proc (Linux)") from None
        if not _under(real, roots):
            raise DeadLetterError(ErrorCode.URI_NOT_ALLOWED, f"{path} is outside file_roots")
        fd = os.open(f"/proc/self/fd/{location}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(location)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DeadLetterError(ErrorCode.URI_NOT_ALLOWED, f"not a regular file: {path}")
        if info.st_size > limit:
            raise DeadLetterError(ErrorCode.TOO_LARGE, f"{path} has {info.st_size} bytes, over {limit}")
        # Ask for the size fstat gave (+1 to see growth): os.read allocates what it is asked for, and
        # asking for max_image_bytes made every read map and unmap that much memory.
        chunks, size, want = [], 0, info.st_size + 1
        while size <= limit and (chunk := os.read(fd, min(want, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
            want = 1 << 16
    except OSError as exc:
        raise DeadLetterError(ErrorCode.FETCH_FAILED, f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise DeadLetterError(ErrorCode.TOO_LARGE, f"{path} grew past {limit} bytes while read")
    return b"".join(chunks)


def _under(real: str, roots: list[str]) -> bool:
    """Whether a real path is one of ``roots`` or inside one (string prefixes: no Path objects per event)."""
    return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)
