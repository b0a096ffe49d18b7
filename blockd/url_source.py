"""The pure side of lists downloaded from URLs: when to fetch, what to ask, what to accept.

Config: [lists.X] url, refresh, sha256, max_bytes (blockd.config.ListConfig); the service that
does the downloads is blockd.url_lists.
- Schedule: every refresh seconds plus a random jitter of up to 10 % (so a fleet started
  together does not download in lockstep); after a failure, retries back off from RETRY_BASE
  doubling up to refresh.
- Conditional GET: the validators of the last good download (ETag, Last-Modified), kept next to
  the copy as <list>.list.meta (JSON), become If-None-Match / If-Modified-Since.
- A download is accepted only when whole (as long as its Content-Length says), within max_bytes
  and, with sha256 set, of that digest; DownloadRefused names the reason (a metric label).
Pure: no sockets, no clock (the caller passes the random draw), no files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

JITTER = 0.10  # of refresh
RETRY_BASE = 5.0  # seconds before the first retry
# Failure reasons: the closed set labelling blockd_list_source_failures_total.
REASONS = ("network", "timeout", "status", "truncated", "too_large", "sha256", "refused")


class DownloadRefused(Exception):
    """A download that is not applied: reason is one of REASONS, message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def next_fetch_delay(refresh: float, draw: float) -> float:
    """Seconds until the next regular download; draw is uniform in [0, 1)."""
    return refresh * (1.0 + JITTER * draw)


def first_fetch_delay(refresh: float, copy_age: float | None, draw: float) -> float:
    """Seconds from start to the first download: at once without a copy, else when it is due."""
    if copy_age is None:
        return 0.0
    return max(0.0, next_fetch_delay(refresh, draw) - copy_age)


def retry_delay(failures: int, refresh: float, draw: float) -> float:
    """Seconds before retrying after the failures-th failure in a row (1, 2, ...)."""
    base = min(refresh, RETRY_BASE * 2.0 ** max(0, failures - 1))
    return base * (1.0 + JITTER * draw)


@dataclass(frozen=True)
class Validators:
    """What the server said identifies the last good download (None: it said nothing)."""

    etag: str | None = None
    last_modified: str | None = None

    def request_headers(self) -> dict[str, str]:
        headers = {}
        if self.etag is not None:
            headers["If-None-Match"] = self.etag
        if self.last_modified is not None:
            headers["If-Modified-Since"] = self.last_modified
        return headers

    def render(self, url: str) -> str:
        return json.dumps({"url": url, "etag": self.etag, "last_modified": self.last_modified})


def parse_validators(text: str, url: str) -> Validators:
    """The stored validators, or none when they are unreadable or were for another URL."""
    try:
        data = json.loads(text)
    except ValueError:
        return Validators()
    if not isinstance(data, dict) or data.get("url") != url:
        return Validators()
    etag, modified = data.get("etag"), data.get("last_modified")
    return Validators(
        etag if isinstance(etag, str) and etag.isprintable() else None,
        modified if isinstance(modified, str) and modified.isprintable() else None,
    )


def header_value(value: str | None) -> str | None:
    """A response header kept only when it can be sent back as is (printable, bounded)."""
    if value is None or len(value) > 1024 or not value.isprintable():
        return None
    return value


def declared_length(value: str | None, max_bytes: int) -> int | None:
    """The Content-Length, checked against max_bytes before any body is read."""
    if value is None:
        return None
    if not value.isdigit():
        raise DownloadRefused("status", f"invalid Content-Length {value[:40]!r}")
    length = int(value)
    if length > max_bytes:
        raise DownloadRefused("too_large", f"Content-Length {length} is more than max_bytes ({max_bytes})")
    return length


def check_download(body: bytes, length: int | None, max_bytes: int, sha256: str | None) -> None:
    """Raise DownloadRefused unless body is a whole download within bounds and of the pinned digest."""
    if len(body) > max_bytes:
        raise DownloadRefused("too_large", f"more than max_bytes ({max_bytes}) bytes")
    if length is not None and len(body) != length:
        raise DownloadRefused("truncated", f"{len(body)} bytes of the {length} that Content-Length says")
    if sha256 is not None:
        digest = hashlib.sha256(body).hexdigest()
        if digest != sha256:
            raise DownloadRefused("sha256", f"SHA-256 {digest}, not the {sha256} that sha256 pins")


__all__ = [
    "REASONS",
    "DownloadRefused",
    "Validators",
    "check_download",
    "declared_length",
    "first_fetch_delay",
    "header_value",
    "next_fetch_delay",
    "parse_validators",
    "retry_delay",
]
