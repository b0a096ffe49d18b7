"""The README's first command: `blockd run` with no config answers the dig examples.

Only blocked names are asked, so the embedded default's upstreams (/etc/resolv.conf) never see
a packet: every client is in the default blocking group and these names are on its lists.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.daemon import REPO

PORTS_FREE = True
for port, kind in ((5353, socket.SOCK_DGRAM), (5353, socket.SOCK_STREAM), (9553, socket.SOCK_STREAM)):
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            PORTS_FREE = False


def dig(*args: str) -> str:
    result = subprocess.run(
        ["dig", "@127.0.0.1", "-p", "5353", "+tries=1", "+time=3", *args], capture_output=True, text=True, timeout=10
    )
    return result.stdout


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed (Debian package dnsutils)")
@pytest.mark.skipif(not PORTS_FREE, reason="127.0.0.1:5353 or :9553 is in use on this machine")
def test_readme_dig_examples_against_the_embedded_default() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "blockd", "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        deadline = time.monotonic() + 20
        while dig("www.tiktok.com", "+short").strip() != "0.0.0.0" and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            time.sleep(0.1)
        assert dig("www.tiktok.com", "+short").strip() == "0.0.0.0"
        assert dig("www.tiktok.com", "AAAA", "+short").strip() == "::"
        https = dig("www.tiktok.com", "HTTPS")
        assert "status: NOERROR" in https and "ANSWER: 0" in https
        assert "SOA" in https and "blockd.invalid." in https
        assert "EDE: 15 (Blocked)" in https
        assert "status: NXDOMAIN" in dig("dns.google")  # doh-bypass list, per-list action
    finally:
        process.terminate()
        process.wait(timeout=10)
