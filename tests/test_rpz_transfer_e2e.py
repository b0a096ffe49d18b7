"""RPZ by zone transfer, end to end: a real Knot primary, the real blockd, dnspython as the client.

Knot (from Debian) serves an RPZ zone on loopback with a TSIG key and sends NOTIFY to blockd's
DNS port; blockd transfers it (AXFR at start, IXFR after each change) and answers from it.
Each test starts knotd and blockd itself, each with its own config in a temp dir, and stops
them by PID.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.opcode
import dns.query
import dns.rcode
import pytest

from tests.daemon import GOV, OTHER, Daemon, free_port, rcode_name, wait_until
from tests.fakeupstream import FakeUpstream
from tests.knot import KNOT_SERVER, Knot, needs_knot

pytestmark = needs_knot
ZONE = "rpz.gov.test"
SECRET = base64.b64encode(b"blockd-e2e-rpz-secret-32-bytes!!").decode()
WRONG = base64.b64encode(b"not-the-secret-the-primary-has!!").decode()

ZONE_FILE = """\
$TTL 300
@ SOA ns.gov.test. hostmaster.gov.test. {serial} 3600 600 86400 60
@ NS ns.gov.test.
tiktok.com CNAME .
*.tiktok.com CNAME .
douyin.com CNAME *.
{extra}"""

KNOT_CONF = (
    KNOT_SERVER
    + """\
key:
  - id: rpz-key
    algorithm: hmac-sha256
    secret: {secret}
remote:
  - id: blockd
    address: 127.0.0.1@{blockd_port}
    key: rpz-key
acl:
  - id: transfer
    address: 127.0.0.1
    key: rpz-key
    action: transfer
zone:
  - domain: {zone}.
    storage: "{dir}"
    file: "{zone}.zone"
    acl: transfer
    notify: blockd
    zonefile-load: difference
    journal-content: changes
    zonefile-sync: -1
    semantic-checks: off
"""
)

BLOCKD_CONF = """\
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"
[upstream]
servers = ["{upstream}"]
timeout = 1.0
[metrics]
listen = "127.0.0.1:{metrics_port}"
[lists.gov-rpz]
zone = "{zone}."
primaries = ["127.0.0.1:{knot_port}"]
tsig = "rpz.key"
[lists.later]
path = "later.txt"
[groups.government]
networks = ["127.0.0.2/32"]
lists = ["gov-rpz", "later"]
"""


@dataclass
class Site:
    knot: Knot
    blockd: Daemon
    directory: Path

    def metric(self, name: str, **labels: str) -> float | None:
        assert self.blockd is not None
        return self.blockd.metric(name, **labels)



def answer_of(message: dns.message.Message) -> str:
    return rcode_name(message) + " " + " ".join(sorted(r.to_text() for rrset in message.answer for r in rrset))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Callable[..., Site]]:
    upstream = FakeUpstream()
    started: list[Site] = []

    def make(secret: str = SECRET, start_knot: bool = True) -> Site:
        knot_dir = tmp_path / "knot"
        for sub in ("run", "storage"):
            (knot_dir / sub).mkdir(parents=True, exist_ok=True)
        blockd_port, knot_port = (
            (started[0].blockd.port, started[0].knot.port) if started else (free_port(), free_port())
        )
        conf = knot_dir / "knot.conf"
        conf.write_text(
            KNOT_CONF.format(dir=knot_dir, port=knot_port, secret=SECRET, zone=ZONE, blockd_port=blockd_port)
        )
        knot = started[0].knot if started else Knot(knot_dir, knot_port, conf, ZONE, ZONE_FILE)
        if start_knot and (knot.process is None or knot.process.poll() is not None):
            if not (knot_dir / f"{ZONE}.zone").exists():
                knot.write_zone(1)
            knot.start()
            knot.wait_for_serial(int((knot_dir / f"{ZONE}.zone").read_text().split()[6]))
        (tmp_path / "rpz.key").write_text(
            f'key "rpz-key" {{\n    algorithm hmac-sha256;\n    secret "{secret}";\n}};\n'
        )
        (tmp_path / "later.txt").write_text("ok.tiktok.com\nlater.example\n")
        config = tmp_path / "blockd.toml"
        metrics_port = free_port()
        config.write_text(
            BLOCKD_CONF.format(
                port=blockd_port, upstream=upstream.address, metrics_port=metrics_port, zone=ZONE, knot_port=knot_port
            )
        )
        blockd = Daemon(config, blockd_port, metrics_port).start()
        made = Site(knot, blockd, tmp_path)
        started.append(made)
        return made

    yield make
    for made in started:
        made.blockd.stop()
    if started:
        started[0].knot.stop()
    upstream.close()


def test_axfr_with_tsig_at_start_then_notify_and_ixfr_within_two_seconds(site: Callable[..., Site]) -> None:
    s = site()
    blockd = s.blockd
    wait_until(lambda: rcode_name(blockd.query("www.tiktok.com")) == "NXDOMAIN", 15, "the first AXFR", blockd.log)
    assert answer_of(blockd.query("tiktok.com")) == "NXDOMAIN "
    assert answer_of(blockd.query("douyin.com")) == "NOERROR "  # CNAME *.: NODATA
    assert answer_of(blockd.query("www.tiktok.com", source=OTHER)) == "NOERROR 192.0.2.1"  # not in the group
    assert s.metric("blockd_list_serial", list="gov-rpz") == 1
    assert (s.directory / "state" / "gov-rpz.rpz").exists()  # the last good copy
    # The primary's zone changes: NOTIFY reaches blockd, which transfers by IXFR at once.
    s.knot.write_zone(2, extra="newly.example CNAME .\n*.newly.example CNAME .\n")
    s.knot.knotc("zone-reload", f"{ZONE}.")
    took = wait_until(
        lambda: rcode_name(blockd.query("a.newly.example")) == "NXDOMAIN",
        2.0,
        "the change via NOTIFY + IXFR",
        blockd.log,
    )
    assert took < 2.0
    assert s.metric("blockd_list_serial", list="gov-rpz") == 2
    assert (s.metric("blockd_zone_transfers_total", list="gov-rpz", type="ixfr", result="incremental") or 0) >= 1
    assert (s.metric("blockd_notify_total", result="accepted") or 0) >= 1


def test_rpz_passthru_in_a_transferred_zone_and_a_later_list(site: Callable[..., Site]) -> None:
    s = site()
    s.knot.write_zone(2, extra="ok.tiktok.com CNAME rpz-passthru.\n")
    s.knot.knotc("zone-reload", f"{ZONE}.")
    blockd = s.blockd
    wait_until(lambda: s.metric("blockd_list_serial", list="gov-rpz") == 2, 15, "serial 2", blockd.log)
    # The zone comes first in the group: its passthru beats the later list that lists the name.
    assert answer_of(blockd.query("ok.tiktok.com")) == "NOERROR 192.0.2.1"
    assert answer_of(blockd.query("later.example")) == "NOERROR 0.0.0.0"  # the later list still blocks the rest


def test_a_wrong_key_is_refused_with_the_reason(site: Callable[..., Site]) -> None:
    s = site(secret=WRONG)
    blockd = s.blockd
    wait_until(
        lambda: "BADSIG" in blockd.log() or "BADKEY" in blockd.log() or "TSIG" in blockd.log(),
        15,
        "refusal",
        blockd.log,
    )
    assert answer_of(blockd.query("www.tiktok.com")) == "NOERROR 192.0.2.1"  # nothing was applied
    assert s.metric("blockd_list_serial", list="gov-rpz") is None
    assert "Traceback" not in blockd.log()


def test_primary_down_and_blockd_restarted_the_last_good_copy_serves(site: Callable[..., Site]) -> None:
    first = site()
    wait_until(lambda: rcode_name(first.blockd.query("www.tiktok.com")) == "NXDOMAIN", 15, "AXFR", first.blockd.log)
    first.blockd.stop()
    first.knot.stop()
    second = site(start_knot=False)  # the same config and state directory; the primary is gone
    assert rcode_name(second.blockd.query("www.tiktok.com")) == "NXDOMAIN"
    assert second.metric("blockd_list_serial", list="gov-rpz") == 1
    assert "from the stored copy" in second.blockd.log()


def test_notify_from_anyone_else_is_refused(site: Callable[..., Site]) -> None:
    s = site()
    notify = dns.message.make_query(f"{ZONE}.", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    reply = dns.query.udp(notify, "127.0.0.1", port=s.blockd.port, source=GOV, timeout=3)
    assert reply.rcode() == dns.rcode.REFUSED  # 127.0.0.2 is not the primary (127.0.0.1)
    assert s.metric("blockd_notify_total", result="not_primary") == 1
    unsigned = dns.query.udp(notify, "127.0.0.1", port=s.blockd.port, timeout=3)
    assert unsigned.rcode() == dns.rcode.REFUSED  # from the primary's address, but unsigned
    assert s.metric("blockd_notify_total", result="unsigned") == 1
