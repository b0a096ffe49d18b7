"""Throwaway network namespaces for tests: create, wire with veth pairs, run traffic, delete.

Every namespace is named blockd-t-<random> and deleted in the fixture's teardown, pass or fail.
Nothing here reads or changes the host's own links, rules or routes (host_tables() lets a test
prove it); traffic stays between namespaces joined by veth pairs, on documentation and private
ranges.  Tests that need namespaces use `needs_netns`: they run whenever the process is root and
`ip netns add` works (CI), and skip with the reason otherwise.

tests/conftest.py loads this module as a plugin, so its fixtures (make_ns, topology,
netns_available) are available to every test module; pyroute2 is imported only when a
namespace socket is made, so the other tests run without it.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    probe = f"blockd-t-probe-{secrets.token_hex(4)}"
    try:
        result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run `ip netns add`: {exc}"
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return None


@pytest.fixture(scope="session")
def netns_available() -> None:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


needs_netns = pytest.mark.usefixtures("netns_available")


def ip(namespace: str, *args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", "-n", namespace, *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise AssertionError(f"ip -n {namespace} {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def ip_batch(namespace: str, commands: str) -> None:
    result = subprocess.run(
        ["ip", "-n", namespace, "-batch", "-"], input=commands, capture_output=True, text=True, timeout=20
    )
    if result.returncode != 0:
        raise AssertionError(f"ip -n {namespace} -batch: {result.stderr.strip()}\n{commands}")


def sysctl(namespace: str, setting: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "sysctl", "-qw", setting], check=True, timeout=20)


@pytest.fixture
def make_ns() -> Iterator[Callable[[], str]]:
    created: list[str] = []

    def make() -> str:
        name = f"blockd-t-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=20)
        created.append(name)
        ip(name, "link", "set", "lo", "up")
        return name

    yield make
    for name in created:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
    assert not any(name in leftover for name in created)


def blockd_rules(namespace: str) -> list[str]:
    lines = ip(namespace, "-4", "rule", "show").splitlines() + ip(namespace, "-6", "rule", "show").splitlines()
    return [" ".join(line.split()) for line in lines if "lookup 1120" in line]


def table_routes(namespace: str, family: str = "-4") -> list[str]:
    return [" ".join(line.split()) for line in ip(namespace, family, "route", "show", "table", "1120").splitlines()]


PORT = 8080


def connect(namespace: str, address: str, timeout: float = 5.0) -> tuple[int, float]:
    """(errno or 0, seconds) of a TCP connect from inside a namespace."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = netns_socket(namespace, family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        started = time.monotonic()
        try:
            sock.connect((address, PORT))
            code = 0
        except TimeoutError:
            code = errno.ETIMEDOUT
        except OSError as exc:
            code = exc.errno or -1
        return code, time.monotonic() - started
    finally:
        sock.close()


def listen(namespace: str, family: int, address: str) -> socket.socket:
    sock = netns_socket(namespace, family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, PORT))
    sock.listen(64)  # the kernel completes handshakes into the backlog: no accept() needed
    return sock


@pytest.fixture
def topology(make_ns: Callable[[], str]) -> Iterator[dict[str, str]]:
    """gateway with veth links to a government client, another client and an "internet".

    gov    10.120.0.2/24 fd00:120::2/64   -- g0 10.120.0.1 fd00:120::1 --+
    other  10.130.0.2/24 fd00:130::2/64   -- g2 10.130.0.1 fd00:130::1 --+- gateway (forwarding)
    inet   192.0.2.2/24 2001:db8:1::2/64  -- g1 192.0.2.1 2001:db8:1::1 -+
    inet listens on 198.51.100.10 (a "listed" prefix) and 203.0.113.10 (unlisted), and the
    IPv6 pair 2001:db8:51::10 / 2001:db8:203::10.
    """
    names = {role: make_ns() for role in ("gateway", "gov", "other", "inet")}
    gw, gov, other, inet = names["gateway"], names["gov"], names["other"], names["inet"]
    ip_batch(
        gw,
        f"link add g0 type veth peer name c0 netns {gov}\n"
        f"link add g2 type veth peer name o0 netns {other}\n"
        f"link add g1 type veth peer name i0 netns {inet}\n"
        "addr add 10.120.0.1/24 dev g0\naddr add fd00:120::1/64 dev g0 nodad\n"
        "addr add 10.130.0.1/24 dev g2\naddr add fd00:130::1/64 dev g2 nodad\n"
        "addr add 192.0.2.1/24 dev g1\naddr add 2001:db8:1::1/64 dev g1 nodad\n"
        "link set g0 up\nlink set g1 up\nlink set g2 up\n"
        "route add 198.51.100.0/24 via 192.0.2.2\nroute add 203.0.113.0/24 via 192.0.2.2\n"
        "route add 2001:db8:51::/48 via 2001:db8:1::2\nroute add 2001:db8:203::/48 via 2001:db8:1::2\n",
    )
    for client, device, v4, v6 in ((gov, "c0", "10.120.0", "fd00:120"), (other, "o0", "10.130.0", "fd00:130")):
        ip_batch(
            client,
            f"addr add {v4}.2/24 dev {device}\naddr add {v6}::2/64 dev {device} nodad\nlink set {device} up\n"
            f"route add default via {v4}.1\nroute add default via {v6}::1\n",
        )
    ip_batch(
        inet,
        "addr add 192.0.2.2/24 dev i0\naddr add 2001:db8:1::2/64 dev i0 nodad\nlink set i0 up\n"
        "addr add 198.51.100.10/32 dev lo\naddr add 203.0.113.10/32 dev lo\n"
        "addr add 2001:db8:51::10/128 dev lo\naddr add 2001:db8:203::10/128 dev lo\n"
        "route add 10.0.0.0/8 via 192.0.2.1\nroute add fd00::/8 via 2001:db8:1::1\n",
    )
    sysctl(gw, "net.ipv4.ip_forward=1")
    sysctl(gw, "net.ipv6.conf.all.forwarding=1")
    # ICMP errors are rate-limited per destination (1/s for ICMPv6 by default): a test making
    # several blocked connects in a row would see the second one wait for a SYN retransmit.
    sysctl(gw, "net.ipv4.icmp_ratelimit=0")
    sysctl(gw, "net.ipv6.icmp.ratelimit=0")
    listeners = [listen(inet, socket.AF_INET, "0.0.0.0"), listen(inet, socket.AF_INET6, "::")]
    try:
        yield names
    finally:
        for sock in listeners:
            sock.close()


BLOCKED = {errno.EHOSTUNREACH, errno.EACCES, errno.ENETUNREACH}


def netns_socket(namespace: str, family: int, kind: int) -> socket.socket:
    """A socket inside a namespace (which must exist: flags=0 never creates one)."""
    from pyroute2 import netns as pyroute2_netns

    return pyroute2_netns.create_socket(namespace, family, kind, flags=0)


def host_tables() -> str:
    """The host's own rules and routes, to compare before and after a test."""
    commands = (["ip", "-4", "rule"], ["ip", "-6", "rule"], ["ip", "-4", "route", "show", "table", "all"],
                ["ip", "-6", "route", "show", "table", "all"])  # fmt: skip
    return "\n".join(subprocess.run(c, capture_output=True, text=True, timeout=20).stdout for c in commands)
