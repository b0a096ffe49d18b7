"""Lists from URLs (blockd.url_lists): the real daemon against an HTTPS server on loopback.

The server (http.server + ssl in a thread) presents a certificate from a throwaway CA made by the
test, which the config names as ca_file.  Refresh is 1 s; every wait is bounded.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dns.exception
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.daemon import GOV, Daemon, free_port, wait_until
from tests.fakeupstream import FakeUpstream

LIST_A = "".join(f"a{index}.example\n" for index in range(20)) + "first.example\n"
LIST_B = "".join(f"a{index}.example\n" for index in range(20)) + "second.example\n"


# -- a throwaway CA and a certificate for 127.0.0.1 -------------------------------------------------


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blockd test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, cert_path, key_path


# -- the list server ----------------------------------------------------------------------------------


@dataclass
class ListServer:
    """Serves `body` at /list.txt with an ETag; `mode` makes a bad answer on purpose."""

    body: bytes = LIST_A.encode()
    mode: str = "ok"  # ok | truncated | unsized
    requests: list[dict[str, str]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'


def _handler(state: ListServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            with state.lock:
                body, mode, etag = state.body, state.mode, state.etag()
                state.requests.append({k.lower(): v for k, v in self.headers.items()})
            if self.headers.get("If-None-Match") == etag and mode == "ok":
                self._answer(304)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._answer(200)
            self.send_header("ETag", etag)
            if mode != "unsized":  # unsized: no Content-Length, the body ends when the connection closes
                self.send_header("Content-Length", str(len(body) + (100 if mode == "truncated" else 0)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def _answer(self, code: int) -> None:
            with state.lock:
                state.answers.append(code)
            self.send_response(code)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


class HttpsServer:
    def __init__(self, state: ListServer, cert: Path, key: Path, port: int = 0):
        self.state = state
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(state))
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class ConnectProxy:
    """An HTTP proxy on loopback that only tunnels (CONNECT), recording each target."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.targets: list[str] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            client.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 8192:
                chunk = client.recv(4096)
                if not chunk:
                    return
                request += chunk
            method, target = request.split(b" ", 2)[:2]
            self.targets.append(target.decode())
            host, _, port = target.decode().rpartition(":")
            if method != b"CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            with socket.create_connection((host, int(port)), timeout=10) as server:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                rest = request.split(b"\r\n\r\n", 1)[1]
                if rest:
                    server.sendall(rest)
                back = threading.Thread(target=_relay, args=(server, client), daemon=True)
                back.start()
                _relay(client, server)
                back.join(timeout=10)

    def close(self) -> None:
        self.listener.close()


def _relay(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


# -- the site: server, upstream, blockd -------------------------------------------------------------

CONF = """\
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"
[upstream]
servers = ["{upstream}"]
timeout = 1.0
[metrics]
listen = "127.0.0.1:{metrics_port}"
[lists.remote]
url = "https://127.0.0.1:{https_port}/list.txt"
ca_file = "ca.pem"
refresh = 1
max_bytes = {max_bytes}
{extra}
[groups.government]
networks = ["127.0.0.2/32"]
lists = ["remote"]
"""


@dataclass
class Site:
    directory: Path
    state: ListServer
    server: HttpsServer | None
    blockd: Daemon | None = None
    cert: tuple[Path, Path] | None = None

    def start_blockd(self, max_bytes: int = 4096, extra: str = "", upstream: str = "") -> Daemon:
        port, metrics_port = free_port(), free_port()
        https_port = self.server.port if self.server is not None else free_port()
        config = self.directory / "blockd.toml"
        config.write_text(
            CONF.format(
                port=port, upstream=upstream, metrics_port=metrics_port, https_port=https_port,
                max_bytes=max_bytes, extra=extra,
            )
        )  # fmt: skip
        self.blockd = Daemon(config, port, metrics_port).start()
        return self.blockd

    def blocked(self, name: str) -> bool:
        assert self.blockd is not None
        answer = self.blockd.query(name, source=GOV, timeout=2)
        return any("0.0.0.0" in r.to_text() for rrset in answer.answer for r in rrset)

    def metric(self, name: str, **labels: str) -> float | None:
        assert self.blockd is not None
        return self.blockd.metric(name, **labels)

    def log(self) -> str:
        return self.blockd.log() if self.blockd is not None else ""



@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Site, str]]:
    ca, cert, key = _certificates(tmp_path)
    upstream = FakeUpstream()
    state = ListServer()
    made = Site(tmp_path, state, HttpsServer(state, cert, key), cert=(cert, key))
    assert ca.exists()
    yield made, upstream.address
    if made.blockd is not None:
        made.blockd.stop()
    if made.server is not None:
        made.server.close()
    upstream.close()


def test_download_then_304_then_a_change_applied_without_losing_a_query(site: tuple[Site, str]) -> None:
    made, upstream = site
    made.start_blockd(upstream=upstream)
    wait_until(lambda: made.blocked("first.example"), 10, "the first download blocking", made.log)
    copy = made.directory / "state" / "remote.list"
    assert copy.read_text() == LIST_A
    # The next refresh asks conditionally and gets 304: the list is unchanged.
    wait_until(lambda: 304 in made.state.answers, 10, "a 304 on refresh", made.log)
    with made.state.lock:
        conditional = [r for r in made.state.requests if "if-none-match" in r]
    assert conditional and conditional[0]["if-none-match"] == made.state.etag()
    assert made.blocked("first.example") and copy.read_text() == LIST_A
    assert (made.metric("blockd_list_source_last_success_timestamp_seconds", list="remote") or 0) > time.time() - 60
    assert made.metric("blockd_list_source_bytes", list="remote") == len(LIST_A)
    assert made.metric("blockd_list_source_refresh_seconds", list="remote") == 1

    # A changed list is applied while queries keep flowing: none is lost.
    lost: list[str] = []
    answered = [0]
    stop = threading.Event()

    def ask() -> None:
        assert made.blockd is not None
        while not stop.is_set():
            try:
                made.blockd.query("a3.example", source=GOV, timeout=1)
                answered[0] += 1
            except (dns.exception.Timeout, OSError) as exc:
                lost.append(repr(exc))
            time.sleep(0.002)  # below the per-client rate limit (1,000 qps): a dropped query is not a lost one

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    try:
        with made.state.lock:
            made.state.body = LIST_B.encode()
        wait_until(lambda: made.blocked("second.example"), 10, "the changed list blocking", made.log)
        time.sleep(0.3)
    finally:
        stop.set()
        asker.join(timeout=5)
    assert not made.blocked("first.example")
    assert not lost and answered[0] > 10
    assert copy.read_text() == LIST_B


def test_server_down_at_start_the_last_good_copy_serves(site: tuple[Site, str]) -> None:
    made, upstream = site
    made.start_blockd(upstream=upstream)
    wait_until(lambda: made.blocked("first.example"), 10, "the first download blocking", made.log)
    assert made.blockd is not None and made.server is not None
    made.blockd.stop()
    made.server.close()
    made.server = None
    made.start_blockd(upstream=upstream)  # the URL's port now refuses connections
    assert made.blocked("first.example"), made.log()  # at once: from the copy
    wait_until(
        lambda: (made.metric("blockd_list_source_failures_total", list="remote", reason="network") or 0) >= 1,
        10,
        "a counted network failure",
        made.log,
    )
    assert made.blocked("first.example")
    assert "download from" in made.log() and "failed (network)" in made.log()


def test_truncated_oversized_and_mismatched_downloads_are_refused_keeping_the_copy(site: tuple[Site, str]) -> None:
    made, upstream = site
    pin = hashlib.sha256(LIST_A.encode()).hexdigest()
    made.start_blockd(max_bytes=2000, extra=f'sha256 = "{pin}"', upstream=upstream)
    wait_until(lambda: made.blocked("first.example"), 10, "the first download blocking", made.log)
    copy = made.directory / "state" / "remote.list"

    def refused(reason: str) -> Callable[[], bool]:
        before = made.metric("blockd_list_source_failures_total", list="remote", reason=reason) or 0
        return lambda: (made.metric("blockd_list_source_failures_total", list="remote", reason=reason) or 0) > before

    cases = [
        ("truncated", LIST_A.encode(), "truncated"),  # Content-Length 100 more than the body
        ("too_large", ("".join(f"big{i}.example\n" for i in range(200))).encode(), "ok"),  # by Content-Length
        ("too_large", ("".join(f"big{i}.example\n" for i in range(200))).encode(), "unsized"),  # as it arrives
        ("sha256", LIST_B.encode(), "ok"),
    ]
    for reason, body, mode in cases:
        with made.state.lock:
            made.state.body, made.state.mode = body, mode
        wait_until(refused(reason), 10, f"a download refused ({reason})", made.log)
        assert made.blocked("first.example") and not made.blocked("second.example")
        assert copy.read_text() == LIST_A
    assert not (made.directory / "state" / "remote.list.new").exists() or copy.read_text() == LIST_A


def test_a_download_that_shrinks_the_list_is_refused_by_the_shrink_guard(site: tuple[Site, str]) -> None:
    made, upstream = site
    made.start_blockd(upstream=upstream)
    wait_until(lambda: made.blocked("first.example"), 10, "the first download blocking", made.log)
    with made.state.lock:
        made.state.body = b"second.example\n"  # 1 entry of 21: a truncated feed, say
    wait_until(
        lambda: (made.metric("blockd_list_source_failures_total", list="remote", reason="refused") or 0) >= 1,
        10,
        "the shrink guard refusing the download",
        made.log,
    )
    assert made.blocked("first.example") and not made.blocked("second.example")
    assert (made.directory / "state" / "remote.list").read_text() == LIST_A
    assert "shrank from 21 to 1 entries" in made.log()


def test_a_download_through_a_connect_proxy(site: tuple[Site, str]) -> None:
    made, upstream = site
    proxy = ConnectProxy()
    try:
        made.start_blockd(upstream=upstream, extra=f'proxy = "http://127.0.0.1:{proxy.port}"')
        wait_until(lambda: made.blocked("first.example"), 10, "the download through the proxy blocking", made.log)
        assert made.server is not None and proxy.targets[0] == f"127.0.0.1:{made.server.port}"
    finally:
        proxy.close()


# -- the pure side (blockd.url_source) ------------------------------------------------------------------


def test_schedule_jitter_and_backoff() -> None:
    from blockd.url_source import first_fetch_delay, next_fetch_delay, retry_delay

    assert next_fetch_delay(1000, 0.0) == 1000 and next_fetch_delay(1000, 0.999) < 1100
    assert first_fetch_delay(1000, None, 0.5) == 0  # no copy: at once
    assert first_fetch_delay(1000, 400, 0.0) == 600 and first_fetch_delay(1000, 5000, 0.0) == 0
    assert [retry_delay(n, 86400, 0.0) for n in (1, 2, 3)] == [5, 10, 20]
    assert retry_delay(30, 600, 0.0) == 600 and retry_delay(1, 1, 0.5) == 1.05  # capped by refresh


def test_conditional_headers_and_stored_validators() -> None:
    from blockd.url_source import Validators, parse_validators

    stored = Validators('"abc"', "Wed, 02 Dec 2026 01:00:00 GMT")
    assert stored.request_headers() == {"If-None-Match": '"abc"', "If-Modified-Since": "Wed, 02 Dec 2026 01:00:00 GMT"}
    assert parse_validators(stored.render("https://a/l"), "https://a/l") == stored
    assert parse_validators(stored.render("https://a/l"), "https://b/l") == Validators()  # another URL
    assert parse_validators("{not json", "https://a/l") == Validators() and Validators().request_headers() == {}


def test_a_download_is_checked_whole_bounded_and_pinned() -> None:
    from blockd.url_source import DownloadRefused, check_download, declared_length

    body = b"a.example\n"
    check_download(body, len(body), 100, hashlib.sha256(body).hexdigest())
    check_download(body, None, 100, None)
    for args, reason in (
        ((body, 20, 100, None), "truncated"),
        ((body, None, 5, None), "too_large"),
        ((body, None, 100, "0" * 64), "sha256"),
    ):
        with pytest.raises(DownloadRefused) as refused:
            check_download(*args)
        assert refused.value.reason == reason
    assert declared_length("10", 100) == 10 and declared_length(None, 100) is None
    with pytest.raises(DownloadRefused, match="more than max_bytes"):
        declared_length("101", 100)
