"""fetch: inline data, file roots, and http(s) against a real local server behind the SSRF guard."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imgdedup import fetch
from imgdedup.config import load_settings
from imgdedup.errors import DeadLetterError, ErrorCode
from imgdedup.fetch import Fetcher, fetch_bytes, forbidden_reason

BODY = bytes(range(256)) * 12  # 3072 bytes
LIMIT = 2048  # max_image_bytes in the size tests (BODY is over it)


def settings(**overrides):
    base = {"fetch_timeout_s": 5.0, "metrics_port": 0}
    base.update(overrides)
    return load_settings(**base)


def code_of(fetcher_or_settings, image) -> ErrorCode:
    with pytest.raises(DeadLetterError) as info:
        if isinstance(fetcher_or_settings, Fetcher):
            fetcher_or_settings.fetch(image)
        else:
            fetch_bytes(image, fetcher_or_settings)
    return info.value.code


# --- a real HTTP server on loopback -------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # http.server calls do_<METHOD>
        self.server.hits.append(self.path)
        path = self.path
        try:
            if path in ("/img", "/redirect/0"):
                self._send(200, BODY)
            elif path == "/small":
                self._send(200, BODY[:LIMIT])
            elif path == "/host":
                self._send(200, self.headers["Host"].encode())
            elif path == "/big-chunked":
                self._chunked([BODY[i:i + 500] for i in range(0, len(BODY), 500)])
            elif path.startswith("/redirect/"):
                n = int(path.rsplit("/", 1)[1])
                self._redirect(f"/redirect/{n - 1}")  # n hops to /redirect/0, which serves BODY
            elif path == "/to-metadata":
                self._redirect("http://169.254.169.254/latest/meta-data/")
            elif path == "/to-ten":
                self._redirect("http://10.1.2.3:8080/img")
            elif path == "/to-ftp":
                self._redirect("ftp://example.com/img.jpg")
            elif path == "/stall":
                time.sleep(3)
                self._send(200, BODY)
            elif path == "/trickle":
                self._chunked(BODY[i:i + 1] for i in range(30))
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, status, body, headers=()):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location):
        self._send(302, b"", [("Location", location)])

    def _chunked(self, chunks):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            if self.path == "/trickle":
                time.sleep(0.1)
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    httpd.hits = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def local_fetcher():
    """A Fetcher allowed to reach the loopback server (closed after the test)."""
    fetchers = []

    def make(**overrides):
        overrides.setdefault("http_allow_hosts", ["127.0.0.1"])
        fetcher = Fetcher(settings(**overrides))
        fetchers.append(fetcher)
        return fetcher

    yield make
    for f in fetchers:
        f.close()


# --- SSRF guard ----------------------------------------------------------------------------------

REFUSED_URLS = [
    "http://127.0.0.1/img", "http://127.1/", "http://2130706433/", "http://10.0.0.1/", "http://172.16.5.4/",
    "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/", "http://100.64.0.1/", "http://0.0.0.0/",
    "http://224.0.0.1/", "http://[::1]/", "http://[::]/", "http://[fe80::1]/", "http://[fd00::1]/",
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:169.254.169.254]/", "http://[64:ff9b::a00:1]/",
    "https://localhost/", "http://LOCALHOST:8080/x",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_private_loopback_and_metadata_addresses_are_refused(url):
    assert code_of(settings(), {"uri": url}) is ErrorCode.URI_NOT_ALLOWED


@pytest.mark.parametrize("uri", ["ftp://example.com/a.jpg", "gopher://x/", "data:image/png;base64,AAAA",
                                 "javascript:alert(1)", "relative/path.jpg", "", "s3://bucket/key"])
def test_other_schemes_are_refused(uri):
    assert code_of(settings(), {"uri": uri}) is ErrorCode.URI_NOT_ALLOWED


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2001:4860:4860::8888"])
def test_public_addresses_pass(addr):
    assert forbidden_reason(ipaddress.ip_address(addr)) is None


def test_a_host_with_any_private_address_is_refused(server):
    """One public and one loopback answer: refused, since a connection might use either."""
    def resolver(host, port, **kw):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("8.8.8.8", "127.0.0.1")]

    fetcher = Fetcher(settings(), resolver=resolver)
    port = server.server_address[1]
    assert code_of(fetcher, {"uri": f"http://mixed.test:{port}/img"}) is ErrorCode.URI_NOT_ALLOWED


def test_allow_list_lets_the_local_server_through(local_fetcher, base):
    assert local_fetcher().fetch({"uri": base + "/img"}) == BODY
    assert local_fetcher(http_allow_hosts=["127.0.0.0/8"]).fetch({"uri": base + "/img"}) == BODY


def test_allow_list_by_hostname(local_fetcher, server):
    port = server.server_address[1]
    fetcher = local_fetcher(http_allow_hosts=["localhost"])
    assert fetcher.fetch({"uri": f"http://localhost:{port}/img"}) == BODY
    assert code_of(fetcher, {"uri": f"http://127.0.0.1:{port}/img"}) is ErrorCode.URI_NOT_ALLOWED


def test_connects_to_the_checked_address_and_keeps_the_host_header(server):
    """`pinned.test` does not resolve on this machine: the bytes can only come from the address our
    resolver returned and the guard checked, while the server still sees the original Host."""
    port = server.server_address[1]
    calls = []

    def resolver(host, port, **kw):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    with Fetcher(settings(http_allow_hosts=["127.0.0.1"]), resolver=resolver) as fetcher:
        assert fetcher.fetch({"uri": f"http://pinned.test:{port}/host"}) == f"pinned.test:{port}".encode()
    assert calls == ["pinned.test"]


def test_dns_rebinding_cannot_swap_the_address(server):
    """The first answer (allowed, nothing listens there) is the one connected to; the later answer
    (the real server) is never asked for or reached."""
    port = server.server_address[1]
    answers = iter(["127.0.0.2"] + ["127.0.0.1"] * 10)
    calls = []

    def resolver(host, port, **kw):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    hits_before = len(server.hits)
    with Fetcher(settings(http_allow_hosts=["127.0.0.2/32"]), resolver=resolver) as fetcher:
        assert code_of(fetcher, {"uri": f"http://rebind.test:{port}/img"}) is ErrorCode.FETCH_FAILED
    assert calls == ["rebind.test"]
    assert len(server.hits) == hits_before


def test_unresolvable_host_fails_the_fetch():
    def resolver(host, port, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with Fetcher(settings(), resolver=resolver) as fetcher:
        assert code_of(fetcher, {"uri": "http://nowhere.test/img"}) is ErrorCode.FETCH_FAILED


# --- HTTP behaviour ------------------------------------------------------------------------------


def test_redirects_are_followed_up_to_the_limit(local_fetcher, base):
    fetcher = local_fetcher(fetch_max_redirects=2)
    assert fetcher.fetch({"uri": base + "/redirect/2"}) == BODY
    assert code_of(fetcher, {"uri": base + "/redirect/3"}) is ErrorCode.FETCH_FAILED
    assert code_of(local_fetcher(fetch_max_redirects=0), {"uri": base + "/redirect/1"}) is ErrorCode.FETCH_FAILED


@pytest.mark.parametrize("path", ["/to-metadata", "/to-ten", "/to-ftp"])
def test_each_redirect_hop_is_checked(local_fetcher, base, path):
    assert code_of(local_fetcher(), {"uri": base + path}) is ErrorCode.URI_NOT_ALLOWED


def test_http_error_status_fails_with_the_status(local_fetcher, base):
    with pytest.raises(DeadLetterError) as info:
        local_fetcher().fetch({"uri": base + "/missing"})
    assert info.value.code is ErrorCode.FETCH_FAILED and "404" in info.value.message


def test_body_size_cap(local_fetcher, base):
    fetcher = local_fetcher(max_image_bytes=LIMIT)
    with pytest.raises(DeadLetterError) as info:
        fetcher.fetch({"uri": base + "/img"})
    assert info.value.code is ErrorCode.TOO_LARGE and "Content-Length" in info.value.message
    with pytest.raises(DeadLetterError) as info:
        fetcher.fetch({"uri": base + "/big-chunked"})
    assert info.value.code is ErrorCode.TOO_LARGE and "passed" in info.value.message
    assert fetcher.fetch({"uri": base + "/small"}) == BODY[:LIMIT]


def test_a_stalled_server_times_out(local_fetcher, base):
    assert code_of(local_fetcher(fetch_timeout_s=0.5), {"uri": base + "/stall"}) is ErrorCode.FETCH_TIMEOUT


def test_a_trickling_body_is_cut_at_the_deadline(local_fetcher, base):
    """Each byte comes within the read timeout; only the whole-fetch deadline stops it."""
    assert code_of(local_fetcher(fetch_timeout_s=0.8), {"uri": base + "/trickle"}) is ErrorCode.FETCH_TIMEOUT


def test_one_fetcher_serves_many_threads(local_fetcher, base):
    fetcher = local_fetcher()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: fetcher.fetch({"uri": f"{base}/redirect/{i % 3}"}), range(40)))
    assert results == [BODY] * 40


def test_sha256_is_checked_for_http(local_fetcher, base):
    fetcher = local_fetcher()
    good = hashlib.sha256(BODY).hexdigest()
    assert fetcher.fetch({"uri": base + "/img", "sha256": good.upper()}) == BODY
    assert code_of(fetcher, {"uri": base + "/img", "sha256": "0" * 64}) is ErrorCode.SHA256_MISMATCH


# --- inline data ----------------------------------------------------------------------------------


def test_inline_data_round_trips_and_checks_sha256():
    s = settings()
    data = b"\x89PNG not really" * 10
    text = base64.b64encode(data).decode()
    assert fetch_bytes({"data": text, "content_type": "image/png"}, s) == data
    assert fetch_bytes({"data": text, "sha256": hashlib.sha256(data).hexdigest()}, s) == data
    assert code_of(s, {"data": text, "sha256": hashlib.sha256(b"x").hexdigest()}) is ErrorCode.SHA256_MISMATCH


@pytest.mark.parametrize("text", ["not base64!", "QUJD\n", "QUJDRA", "QUJD RA==", "QUJDRA===", 12345])
def test_bad_base64_fails_the_fetch(text):
    assert code_of(settings(), {"data": text}) is ErrorCode.FETCH_FAILED


def test_inline_data_size_is_capped_before_and_after_decoding():
    s = settings(max_image_bytes=1024)
    with pytest.raises(DeadLetterError) as before:
        fetch_bytes({"data": base64.b64encode(bytes(4000)).decode()}, s)
    assert before.value.code is ErrorCode.TOO_LARGE and "base64 chars" in before.value.message
    with pytest.raises(DeadLetterError) as after:  # 1025 bytes encode to 1368 chars, within the first check
        fetch_bytes({"data": base64.b64encode(bytes(1025)).decode()}, s)
    assert after.value.code is ErrorCode.TOO_LARGE and "decodes to" in after.value.message
    assert len(fetch_bytes({"data": base64.b64encode(bytes(1024)).decode()}, s)) == 1024


@pytest.mark.parametrize("image", [None, {}, {"uri": "file:///x", "data": "QUJD"}, {"content_type": "image/png"}])
def test_image_needs_exactly_one_source(image):
    assert code_of(settings(), image) is ErrorCode.SCHEMA_VIOLATION


# --- file roots ----------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "in.jpg").write_bytes(b"inside")
    (root / "with space.jpg").write_bytes(b"spaced")
    (outside / "secret.jpg").write_bytes(b"secret")
    return root, outside


def test_file_inside_the_roots_is_read(roots):
    root, _ = roots
    s = settings(file_roots=[str(root)])
    assert fetch_bytes({"uri": (root / "in.jpg").as_uri()}, s) == b"inside"
    assert fetch_bytes({"uri": f"file://localhost{root}/in.jpg"}, s) == b"inside"
    assert fetch_bytes({"uri": (root / "with space.jpg").as_uri()}, s) == b"spaced"
    os.symlink(root / "in.jpg", root / "alias.jpg")  # a link that stays inside is fine
    assert fetch_bytes({"uri": (root / "alias.jpg").as_uri()}, s) == b"inside"


def test_dotdot_and_symlink_escapes_are_refused(roots):
    root, outside = roots
    s = settings(file_roots=[str(root)])
    assert code_of(s, {"uri": f"file://{root}/../outside/secret.jpg"}) is ErrorCode.URI_NOT_ALLOWED
    assert code_of(s, {"uri": f"file://{root}/%2e%2e/outside/secret.jpg"}) is ErrorCode.URI_NOT_ALLOWED
    os.symlink(outside / "secret.jpg", root / "link.jpg")
    os.symlink(outside, root / "dirlink")
    assert code_of(s, {"uri": (root / "link.jpg").as_uri()}) is ErrorCode.URI_NOT_ALLOWED
    assert code_of(s, {"uri": f"file://{root}/dirlink/secret.jpg"}) is ErrorCode.URI_NOT_ALLOWED
    assert code_of(s, {"uri": "file:///etc/passwd"}) is ErrorCode.URI_NOT_ALLOWED


def test_the_root_check_is_made_on_what_was_opened(roots):
    """A directory on the path swapped for a symlink to outside: there is no check-then-open window,
    the real path checked is the kernel's name for the descriptor the bytes are then read through."""
    root, outside = roots
    os.symlink(outside, root / "swapped")
    with pytest.raises(DeadLetterError) as caught:
        fetch._read_under_roots(root / "swapped" / "secret.jpg", 1024, [str(root.resolve())])
    assert caught.value.code is ErrorCode.URI_NOT_ALLOWED
    assert fetch._read_under_roots(root / "in.jpg", 1024, [str(root.resolve())]) == b"inside"
    assert fetch._read_under_roots(root / "swapped" / ".." / "root" / "in.jpg", 1024, [str(root.resolve())]) == b"inside"


def test_file_edge_cases(roots):
    root, outside = roots
    s = settings(file_roots=[str(root)], max_image_bytes=1024)
    assert code_of(s, {"uri": (root / "missing.jpg").as_uri()}) is ErrorCode.FETCH_FAILED
    assert code_of(s, {"uri": (outside / "missing.jpg").as_uri()}) is ErrorCode.URI_NOT_ALLOWED  # no existence leak
    assert code_of(s, {"uri": root.as_uri()}) is ErrorCode.URI_NOT_ALLOWED  # a directory
    os.mkfifo(root / "fifo")
    assert code_of(s, {"uri": (root / "fifo").as_uri()}) is ErrorCode.URI_NOT_ALLOWED  # and it must not hang
    (root / "big.jpg").write_bytes(bytes(1025))
    assert code_of(s, {"uri": (root / "big.jpg").as_uri()}) is ErrorCode.TOO_LARGE
    assert code_of(s, {"uri": f"file://fileserver{root}/in.jpg"}) is ErrorCode.URI_NOT_ALLOWED
    assert code_of(settings(), {"uri": (root / "in.jpg").as_uri()}) is ErrorCode.URI_NOT_ALLOWED  # no roots


def test_a_hanging_dns_lookup_ends_at_the_fetch_deadline():
    """getaddrinfo has no timeout of its own; the fetch deadline bounds it. This resolver answers
    only when the test releases it, so without the bound the fetch would wait for the release and
    then be refused for the loopback answer (uri_not_allowed) instead of timing out."""
    release = threading.Event()

    def resolver(host, port, **kw):
        release.wait(30)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    try:
        with Fetcher(settings(fetch_timeout_s=0.2), resolver=resolver) as fetcher:
            assert code_of(fetcher, {"uri": "http://slow-dns.test/img"}) is ErrorCode.FETCH_TIMEOUT
    finally:
        release.set()
