"""Lists downloaded from URLs: the service that fetches them and applies each new copy.

Config: [lists.X] url (http:// or https://), refresh, ca_file, sha256, proxy, max_bytes,
max_line_bytes, allow_shrink; [server] state_dir.  The list's path is its last good copy,
<state_dir>/<list>.list (blockd.config), so every policy build (at start, on reload) reads it
as any list file: blockd starts and blocks from it with no network; without a copy the list
is empty until its first download.
- Downloads use Twisted's HTTP client (the system CA store, or ca_file), conditionally
  (If-None-Match / If-Modified-Since from <list>.list.meta); a 304 only restarts the clock.
- A body is read bounded by max_bytes (the connection is dropped past it), must be whole (as
  long as its Content-Length) and match sha256 when pinned (blockd.url_source), then is written
  next to the copy.  The update is queued with reloads (blockd.reload.Reloader.update): in a
  worker thread the new file replaces the copy and the policy is built from it (parsed with the
  list's bounds, shrink guard); on any failure the old copy is put back, and the serving policy
  never changed.  The swap is one reference: no query is lost.
- Timing and backoff: blockd.url_source (refresh plus jitter, retries doubling from 5 s).
Metrics (blockd.metrics.UrlSourceCollector): blockd_list_source_last_success_timestamp_seconds,
blockd_list_source_failures_total{list,reason}, blockd_list_source_bytes,
blockd_list_source_refresh_seconds, each labelled by list.
With proxy = "http://address:port" every download goes through a CONNECT tunnel of that HTTP
proxy (blockd.http_proxy).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol, ssl, threads
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from blockd import __version__
from blockd.config import Config, ListConfig
from blockd.http_proxy import TunnelEndpointFactory
from blockd.policy import Policy, build_policy
from blockd.reload import UpdateDone
from blockd.url_source import (
    DownloadRefused,
    Validators,
    check_download,
    declared_length,
    first_fetch_delay,
    header_value,
    next_fetch_delay,
    parse_validators,
    retry_delay,
)

_log = Logger()
CONNECT_TIMEOUT = 30.0
DOWNLOAD_TIMEOUT = 300.0  # the whole download, body included
_PEM_END = b"-----END CERTIFICATE-----"


class UrlSetupError(Exception):
    """A downloaded list cannot start (an unreadable ca_file): a start-up error."""


def meta_path(copy: Path) -> Path:
    return copy.with_name(copy.name + ".meta")


@dataclass
class SourceStats:
    """One source's figures, read at scrape time."""

    name: str
    refresh: float
    last_success: float | None = None  # wall clock
    bytes: int | None = None  # of the last good copy
    failures: dict[str, int] = field(default_factory=dict)


class _BoundedBody(protocol.Protocol):
    """A response body, dropped as soon as it passes max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished: defer.Deferred[bytes] = defer.Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.max_bytes:
            self._stop()
            self.finished.errback(DownloadRefused("too_large", f"more than max_bytes ({self.max_bytes}) bytes"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802 (Twisted API)
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(DownloadRefused("truncated", "the connection closed before the body was whole"))


class _Discard(protocol.Protocol):
    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        self.transport.stopProducing()  # type: ignore[union-attr]


def _trust_root(ca_file: Path | None) -> Any:
    if ca_file is None:
        return ssl.platformTrust()
    try:
        data = ca_file.read_bytes()
    except OSError as exc:
        raise UrlSetupError(f"{ca_file}: cannot read ca_file: {exc.strerror or exc}") from None
    blocks = [block + _PEM_END for block in data.split(_PEM_END) if b"-----BEGIN CERTIFICATE-----" in block]
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception:  # noqa: BLE001 (pyOpenSSL raises its own error types for bad PEM)
        certificates = []
    if not certificates:
        raise UrlSetupError(f"{ca_file}: ca_file holds no readable PEM certificate")
    return ssl.trustRootFromCertificates(certificates)


class UrlSource(service.Service):
    """One list from a URL: its schedule, downloads and updates."""

    def __init__(
        self,
        reactor: Any,
        config: ListConfig,
        update: Callable[[Callable[[Policy], Policy], UpdateDone], None],
        current_config: Callable[[], Config],
        wall_clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
    ):
        assert config.url is not None and config.path is not None
        self.reactor = reactor
        self.config = config
        self.url = config.url
        self.copy = config.path
        self.update = update
        self.current_config = current_config
        self.wall_clock = wall_clock
        self.draw = draw
        self.stats = SourceStats(config.name, config.refresh)
        self.validators = Validators()
        self.failures_in_row = 0
        self.timer: IDelayedCall | None = None
        self.fetching: defer.Deferred[Any] | None = None
        pool = HTTPConnectionPool(reactor, persistent=False)
        tls = BrowserLikePolicyForHTTPS(_trust_root(config.ca_file))
        if config.proxy is not None:
            tunnels = TunnelEndpointFactory(reactor, config.proxy.host, config.proxy.port, tls, CONNECT_TIMEOUT)
            self.agent = Agent.usingEndpointFactory(reactor, tunnels, pool)
        else:
            self.agent = Agent(reactor, contextFactory=tls, connectTimeout=CONNECT_TIMEOUT, pool=pool)

    # -- schedule ---------------------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        age: float | None = None
        with contextlib.suppress(OSError):
            info = self.copy.stat()
            age = max(0.0, self.wall_clock() - info.st_mtime)
            self.stats.last_success, self.stats.bytes = info.st_mtime, info.st_size
            with contextlib.suppress(OSError):
                self.validators = parse_validators(meta_path(self.copy).read_text(encoding="utf-8"), self.url)
        self._schedule(first_fetch_delay(self.config.refresh, age, self.draw()))

    def stopService(self) -> defer.Deferred[None] | None:  # noqa: N802 (Twisted API)
        super().stopService()
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.fetching is not None:
            self.fetching.cancel()
        return None

    def _schedule(self, delay: float) -> None:
        if self.running:
            self.timer = self.reactor.callLater(delay, self.fetch)

    def _failed(self, reason: str, message: str) -> None:
        self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1
        self.failures_in_row += 1
        delay = retry_delay(self.failures_in_row, self.config.refresh, self.draw())
        _log.error(
            "list {name}: download from {url} failed ({reason}): {error}; the copy in use stays, "
            "retry in {delay:.0f} s",
            name=self.config.name,
            url=self.url,
            reason=reason,
            error=message,
            delay=delay,
        )
        self._schedule(delay)

    def _succeeded(self) -> None:
        self.failures_in_row = 0
        self.stats.last_success = self.wall_clock()
        self._schedule(next_fetch_delay(self.config.refresh, self.draw()))

    # -- one download -----------------------------------------------------------------------

    def fetch(self) -> defer.Deferred[Any]:
        """Download once and apply the result (never fails: failures are counted and logged)."""
        self.timer = None
        headers = Headers({b"User-Agent": [f"blockd/{__version__}".encode()]})
        for name, value in self.validators.request_headers().items():
            headers.addRawHeader(name.encode(), value.encode("latin-1", "replace"))
        requested: defer.Deferred[Any] = self.agent.request(b"GET", self.url.encode("ascii", "strict"), headers)
        requested.addCallback(self._response)
        requested.addTimeout(DOWNLOAD_TIMEOUT, self.reactor)
        requested.addCallbacks(self._downloaded, self._download_failed)
        requested.addErrback(
            lambda failure: _log.failure("list {name}: download bookkeeping failed", failure, name=self.config.name)
        )
        self.fetching = requested
        requested.addBoth(self._fetched)
        return requested

    def _fetched(self, result: object) -> None:
        self.fetching = None

    def _response(self, response: IResponse) -> defer.Deferred[tuple[bytes, Validators]] | None:
        if response.code == 304:
            response.deliverBody(_Discard())
            return None
        if response.code != 200:
            response.deliverBody(_Discard())
            raise DownloadRefused("status", f"HTTP {response.code} {response.phrase.decode('latin-1', 'replace')}")
        # The bounds and the pin as the config says now (a reload may have changed them).
        live = self.current_config().lists.get(self.config.name, self.config)
        # Twisted takes Content-Length out of the headers into response.length (UNKNOWN_LENGTH without one).
        length = declared_length(str(response.length) if isinstance(response.length, int) else None, live.max_bytes)
        body = _BoundedBody(live.max_bytes)
        response.deliverBody(body)
        validators = Validators(
            header_value(_first(response.headers, b"etag")), header_value(_first(response.headers, b"last-modified"))
        )

        def checked(data: bytes) -> tuple[bytes, Validators]:
            check_download(data, length, live.max_bytes, live.sha256)
            return data, validators

        return body.finished.addCallback(checked)

    def _download_failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError) and not self.running:
            return
        if failure.check(DownloadRefused):
            refused = failure.value
            self._failed(refused.reason, refused.message)
        elif failure.check(defer.TimeoutError, error.TimeoutError):
            self._failed("timeout", f"no complete answer within {DOWNLOAD_TIMEOUT:.0f} s")
        else:
            self._failed("network", failure.getErrorMessage() or failure.type.__name__)

    def _downloaded(self, result: tuple[bytes, Validators] | None) -> defer.Deferred[None] | None:
        if result is None:  # 304: the copy is current
            with contextlib.suppress(OSError):
                os.utime(self.copy)
            self._succeeded()
            return None
        body, validators = result
        staging = self.copy.with_name(self.copy.name + ".new")
        written = threads.deferToThread(_write, staging, body)
        written.addCallback(lambda _: self._apply(staging, body, validators))
        written.addErrback(
            lambda failure: self._failed("refused", f"cannot write {staging}: {failure.getErrorMessage()}")
        )
        return written

    def _apply(self, staging: Path, body: bytes, validators: Validators) -> defer.Deferred[None]:
        applied: defer.Deferred[None] = defer.Deferred()
        name, copy = self.config.name, self.copy
        backup = copy.with_name(copy.name + ".old")

        def build(previous: Policy) -> Policy:
            # Worker thread, queued with reloads: nothing else reads the copy meanwhile.
            had_copy = copy.exists()
            if had_copy:
                os.replace(copy, backup)
            os.replace(staging, copy)
            try:
                return build_policy(self.current_config(), previous)
            except BaseException:
                if had_copy:
                    os.replace(backup, copy)  # the old copy stays the last good one
                else:
                    copy.unlink(missing_ok=True)
                raise

        def done(policy: Policy | None, errors: list[str]) -> None:
            if policy is None:
                for line in errors[:20]:
                    _log.error("list {name}: download refused: {error}", name=name, error=line)
                self._failed("refused", errors[0] if errors else "the policy build failed")
            else:
                listed = policy.lists.get(name)
                _log.info(
                    "list {name}: {size} bytes from {url} live, {count} entries",
                    name=name,
                    size=len(body),
                    url=self.url,
                    count=len(listed) if listed is not None else 0,
                )
                self.stats.bytes = len(body)
                self.validators = validators
                threads.deferToThread(_after_apply, backup, meta_path(copy), validators.render(self.url))
                self._succeeded()
            applied.callback(None)

        self.update(build, done)
        return applied


def _first(headers: Headers, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _write(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())


def _after_apply(backup: Path, meta: Path, text: str) -> None:
    backup.unlink(missing_ok=True)
    temporary = meta.with_name(meta.name + ".tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(meta)
    except OSError as exc:
        _log.error("cannot save {meta}: {error}", meta=str(meta), error=exc.strerror or str(exc))


class UrlLists(service.MultiService):
    """Every list downloaded from a URL."""

    def __init__(
        self,
        reactor: Any,
        config: Config,
        update: Callable[[Callable[[Policy], Policy], UpdateDone], None],
        current_config: Callable[[], Config],
    ):
        super().__init__()
        self.sources: dict[str, UrlSource] = {}
        for list_config in config.lists.values():
            if list_config.url is not None:
                source = self.sources[list_config.name] = UrlSource(reactor, list_config, update, current_config)
                source.setServiceParent(self)

    def stats(self) -> list[SourceStats]:
        return [source.stats for _, source in sorted(self.sources.items())]


__all__ = ["SourceStats", "UrlLists", "UrlSetupError", "UrlSource", "meta_path"]
