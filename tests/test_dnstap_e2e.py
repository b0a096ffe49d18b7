"""dnstap end to end: the real blockd streaming to real dnstap readers from Debian.

What this proves: what blockd sends over Frame Streams is read as dnstap by tools blockd has no
code in common with.  fstrm_capture (fstrm-bin) takes the stream on a unix socket and on TCP,
doing the bidirectional handshake (READY/ACCEPT/START ... STOP/FINISH) itself, and writes it to a
file; dnstap-ldns (dnstap-ldns) and BIND's dnstap-read (bind9-utils) decode that file, and the
tests check what they print: message types (CQ/CR, FQ/FR), client addresses, UDP or TCP, the
query names, and the DNS messages themselves (the sinkholed 0.0.0.0, NXDOMAIN, REFUSED).  The
readers do not know dnstap's Policy field, so the tests also decode the frames with the
published dnstap.proto (dnstap_pb2) and check the Policy of each blocked, monitored and refused
answer, the identity and version, and that the messages are the exact bytes on the wire.  They
prove too that `messages` and `forwarder` choose what is sent; that a collector killed and
restarted mid-stream loses no query (every one answered, the outage's events delivered after
the reconnect, the one batch lost to the write error counted); that a full queue drops and
counts exactly what does not fit; and that the `file` output is a Frame Streams file that
SIGHUP reopens.

Each test starts its own fake upstream (tests/fakeupstream.py), collector and blockd on
loopback with configs in tmp_path, and stops them by PID.  The tests skip where a tool is
missing; .ci/run installs them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from dnstap_pb import dnstap_pb2 as pb

from blockd.dnstap import QUEUE_LIMIT  # events kept while the collector is away
from tests.daemon import GOV, Daemon, free_port, wait_until
from tests.fakeupstream import FakeUpstream

WATCH = "127.0.0.3"  # the monitor group
OUTSIDE = "127.0.0.4"  # not in [server] allow: refused
STRICT = "127.0.0.5"  # the nxdomain group
IDENTITY = "e2e-resolver-1"
VERSION = "blockd-e2e 1.0"
TIKTOK_WIRE = b"\x06tiktok\x03com\x00"  # the list entry every *.tiktok.com query matches
CONTENT_TYPE = b"protobuf:dnstap.Dnstap"

CONFIG = """\
[server]
listen = ["127.0.0.1:{port}"]
allow = ["127.0.0.2/32", "127.0.0.3/32", "127.0.0.5/32"]

[upstream]
servers = ["{upstream}"]
timeout = 1.0

[metrics]
listen = "127.0.0.1:{metrics_port}"

[log]
queries = "none"

[lists.tiktok]
path = "tiktok.txt"

[groups.government]
networks = ["127.0.0.2/32"]
lists = ["tiktok"]
action = "sinkhole"

[groups.watch]
networks = ["127.0.0.3/32"]
lists = ["tiktok"]
action = "monitor"

[groups.strict]
networks = ["127.0.0.5/32"]
lists = ["tiktok"]
action = "nxdomain"

[dnstap]
{dnstap}
identity = "{identity}"
version = "{version}"
"""


def need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (apt-get install fstrm-bin dnstap-ldns bind9-utils)")



# -- processes --------------------------------------------------------------------------------


class Capture:
    """fstrm_capture on a unix socket or a TCP port, writing what it reads to `out`."""

    def __init__(self, out: Path, unix: Path | None = None, tcp_port: int | None = None):
        self.out = out
        self.unix = unix
        self.tcp_port = tcp_port
        self.log_path = out.with_suffix(".capture.log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Capture:
        where = ["-u", str(self.unix)] if self.unix is not None else ["-a", "127.0.0.1", "-p", str(self.tcp_port)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["fstrm_capture", "-t", CONTENT_TYPE.decode(), *where, "-w", str(self.out)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._listening, 10, "fstrm_capture listening", self.log)
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"fstrm_capture exited with {self.process.returncode}:\n{self.log()}")
        if self.unix is not None:
            return self.unix.exists() and "opened output file" in self.log()
        # Listening, read from /proc: a probe connection would be a client without a handshake.
        return f":{self.tcp_port:04X} 00000000:0000 0A" in Path("/proc/net/tcp").read_text()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, signum: int = signal.SIGTERM) -> int | None:
        """SIGTERM: it writes STOP and closes the file.  SIGKILL: it just dies."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            os.kill(process.pid, signum)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        return process.returncode


@dataclass
class Site:
    upstream: FakeUpstream
    blockd: Daemon
    directory: Path

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        assert self.blockd.metrics_port is not None
        url = f"http://127.0.0.1:{self.blockd.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        series = []
        for line in text.splitlines():
            found = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
            if found:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
                series.append((found.group(1), labels, float(found.group(3))))
        return series

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the series of `name` with these labels (0 when there is none)."""
        return sum(v for n, got, v in self.metrics() if n == name and labels.items() <= got.items())

    def frames(self, result: str) -> float:
        return self.metric("blockd_dnstap_frames_total", result=result)

    def collector_up(self) -> float:
        return self.metric("blockd_dnstap_collector_up")

    def probe_frames(self) -> float:
        """The frames of the harness's start-up probes (header-only queries, answered FORMERR),
        once they are out: the count the test's own frames are added to."""
        wait_until(lambda: self.collector_up() == 1, 10, "blockd streaming", self.blockd.log)
        time.sleep(0.2)  # every probe's event is queued before start() returns; the writer runs every 50 ms
        return self.frames("sent")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Callable[..., Site]]:
    """make(dnstap lines) -> a started blockd (with its own fake upstream) streaming dnstap."""
    upstream = FakeUpstream()
    started: list[Daemon] = []

    def make(dnstap: str, identity: str = IDENTITY, version: str = VERSION, extra: str = "") -> Site:
        (tmp_path / "tiktok.txt").write_text("tiktok.com\n")
        port, metrics_port = free_port(), free_port()
        config = tmp_path / f"blockd-{len(started)}.toml"
        config.write_text(
            CONFIG.format(
                port=port,
                upstream=upstream.address,
                metrics_port=metrics_port,
                dnstap=dnstap,
                identity=identity,
                version=version,
            )
            + extra
        )
        blockd = Daemon(config, port, metrics_port)
        started.append(blockd)
        blockd.start()
        return Site(upstream, blockd, tmp_path)

    yield make
    for blockd in started:
        blockd.stop()
        assert "Traceback" not in blockd.log(), blockd.log()[-3000:]
    upstream.close()


@pytest.fixture
def captures() -> Iterator[list[Capture]]:
    """Collectors a test starts: stopped (by PID) at the end whatever happened."""
    started: list[Capture] = []
    yield started
    for capture in started:
        capture.stop(signal.SIGKILL)


# -- the client -------------------------------------------------------------------------------

# kind -> (rcode, addresses) of the answer blockd gives
EXPECTED = {
    "blocked": ("NOERROR", ["0.0.0.0"]),
    "nxdomain": ("NXDOMAIN", []),
    "monitored": ("NOERROR", ["192.0.2.1"]),
    "forwarded": ("NOERROR", ["192.0.2.1"]),
    "refused": ("REFUSED", []),
}
SOURCES = {"blocked": GOV, "nxdomain": STRICT, "monitored": WATCH, "forwarded": GOV, "refused": OUTSIDE}


@dataclass
class Asked:
    kind: str
    name: str  # without the final dot
    source: str
    transport: str  # udp | tcp
    query: dns.message.Message
    reply: dns.message.Message

    @property
    def proto(self) -> str:
        return self.transport.upper()


def ask(blockd: Daemon, kind: str, name: str, transport: str, qid: int, rdtype: str = "A") -> Asked:
    """One query from the kind's source address; asserts the answer blockd must give."""
    source = SOURCES[kind]
    query = dns.message.make_query(name, rdtype)
    query.id = qid  # unique in a test: how each reader's output is matched to its query
    if transport == "tcp":
        reply = dns.query.tcp(query, "127.0.0.1", port=blockd.port, source=source, timeout=3)
    else:
        reply = dns.query.udp(query, "127.0.0.1", port=blockd.port, source=source, timeout=3)
    assert reply.id == qid
    if rdtype == "A":
        rcode, addresses = EXPECTED[kind]
        assert dns.rcode.to_text(reply.rcode()) == rcode, (kind, name, transport)
        assert [r.to_text() for rrset in reply.answer for r in rrset] == addresses, (kind, name, transport)
    return Asked(kind, name, source, transport, query, reply)


def ask_every_kind(blockd: Daemon, transports: tuple[str, ...] = ("udp", "tcp")) -> list[Asked]:
    """A query of each kind over each transport, and the blocked one again (blockd's repeat path)."""
    asked = []
    qid = 1000
    for transport in transports:
        for kind in EXPECTED:
            suffix = "tiktok.com" if kind in ("blocked", "nxdomain", "monitored") else "example.org"
            qid += 1
            asked.append(ask(blockd, kind, f"{kind}-{transport}.{suffix}", transport, qid))
        qid += 1
        asked.append(ask(blockd, "blocked", f"blocked-{transport}.tiktok.com", transport, qid))
    return asked


# -- reading what the collector wrote -----------------------------------------------------------


def read_stream(path: Path) -> tuple[list[bytes], list[tuple[int, list[bytes]]]]:
    """A Frame Streams file read by hand: its data frames, and its control frames (type, content
    types).  A data frame is a 32-bit big-endian length and the payload; a control frame is a
    zero length (the escape), its own length, and its body."""
    data = path.read_bytes()
    payloads: list[bytes] = []
    controls: list[tuple[int, list[bytes]]] = []
    at = 0
    while at < len(data):
        assert len(data) - at >= 4, f"{path}: a frame length cut short at byte {at}"
        (length,) = struct.unpack_from("!I", data, at)
        at += 4
        if length == 0:
            (length,) = struct.unpack_from("!I", data, at)
            body = data[at + 4 : at + 4 + length]
            assert len(body) == length, f"{path}: a control frame cut short"
            (kind,) = struct.unpack_from("!I", body)
            fields, field_at = [], 4
            while field_at < len(body):
                field_type, field_length = struct.unpack_from("!II", body, field_at)
                assert field_type == 1  # CONTENT_TYPE, the only field there is
                fields.append(body[field_at + 8 : field_at + 8 + field_length])
                field_at += 8 + field_length
            controls.append((kind, fields))
            at += 4 + length
            continue
        payload = data[at : at + length]
        assert len(payload) == length, f"{path}: a data frame cut short"
        payloads.append(payload)
        at += length
    return payloads, controls


def dnstap_messages(path: Path) -> list[pb.Dnstap]:
    """The file's payloads parsed with the published dnstap.proto; START first, STOP last."""
    payloads, controls = read_stream(path)
    assert controls[0] == (2, [CONTENT_TYPE]), controls  # START with the dnstap content type
    assert controls[-1][0] == 3 and len(controls) == 2, controls  # STOP
    messages = []
    for payload in payloads:
        message = pb.Dnstap()
        message.ParseFromString(payload)
        assert message.type == pb.Dnstap.MESSAGE
        messages.append(message)
    return messages


def run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stderr}"
    return done.stdout


def ldns_quiet(path: Path) -> list[tuple[str, str, str, str]]:
    """dnstap-ldns -q: (type, address, protocol, qname) per line, e.g. CQ 127.0.0.2 UDP x.com."""
    rows = []
    for line in run("dnstap-ldns", "-r", str(path), "-q").splitlines():
        fields = line.split()  # date time type address protocol size "qname" class type
        rows.append((fields[2], fields[3], fields[4], fields[6].strip('"')))
    return rows


def bind_lines(path: Path) -> list[tuple[str, str, str, str, str]]:
    """dnstap-read: (type, client, upstream, protocol, name/class/type) per line:
    `... CQ 127.0.0.2:38444 -> ? UDP 32b www.tiktok.com/IN/A`."""
    rows = []
    for line in run("dnstap-read", str(path)).splitlines():
        fields = line.split()
        rows.append((fields[2], fields[3], fields[5], fields[6], fields[8]))
    return rows


def yaml_documents(text: str) -> list[dict[str, str]]:
    """The YAML of dnstap-ldns -y or dnstap-read -y, flattened (no YAML library in the test
    dependencies): top-level keys, the message's keys as "message.KEY", and its block scalars
    (the DNS messages as text).  Quotes are taken off values."""
    documents = []
    for chunk in re.split(r"^---$", text, flags=re.MULTILINE):
        document: dict[str, str] = {}
        block: str | None = None
        for line in chunk.splitlines():
            if block is not None:
                if line.startswith("    ") or not line.strip():
                    document[block] += line[4:] + "\n"
                    continue
                block = None
            found = re.match(r"^(  )?(\w+): ?(.*)$", line)
            if not found:
                continue
            key = ("message." if found.group(1) else "") + found.group(2)
            value = found.group(3).strip()
            if value == "|":
                block, document[key] = key, ""
            else:
                document[key] = value.strip('"')
        if document:
            documents.append(document)
    return documents


def dns_id(text: str) -> int:
    found = re.search(r"id: +(\d+)", text)
    assert found, text
    return int(found.group(1))


def answer_section(text: str) -> list[str]:
    """The answer records of a DNS message as a reader prints it, whitespace made single spaces."""
    section = text.split(";; ANSWER SECTION:", 1)[1].split("\n;;", 1)[0] if ";; ANSWER SECTION:" in text else ""
    return [" ".join(line.split()) for line in section.splitlines() if line.strip()]


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def client_messages(messages: list[pb.Dnstap]) -> list[pb.Dnstap]:
    """Without the harness's start-up probe (a header-only query from 127.0.0.1)."""
    return [m for m in messages if m.message.query_address != packed("127.0.0.1")]


def of(messages: list[pb.Dnstap], kind: int, asked: Asked) -> list[pb.Message]:
    found = []
    for message in messages:
        m = message.message
        wire = m.query_message if kind == pb.Message.CLIENT_QUERY else m.response_message
        if m.type == kind and m.query_address == packed(asked.source) and wire[:2] == struct.pack("!H", asked.query.id):
            found.append(m)
    return found


# -- the tests --------------------------------------------------------------------------------


def check_policy(message: pb.Message, asked: Asked) -> None:
    if asked.kind == "forwarded":
        assert not message.HasField("policy")
        return
    policy = message.policy
    assert policy.type == "blockd"
    if asked.kind == "refused":
        assert (policy.rule, policy.match, policy.value) == (b"server.allow", pb.Policy.CLIENT_IP, packed(OUTSIDE))
        assert not policy.HasField("action")  # dnstap has no "refused" action
        return
    action = {"blocked": pb.Policy.LOCAL_DATA, "nxdomain": pb.Policy.NXDOMAIN, "monitored": pb.Policy.PASS}
    assert policy.rule == b"tiktok"
    assert policy.action == action[asked.kind], asked
    assert policy.match == pb.Policy.QNAME
    assert policy.value == TIKTOK_WIRE


def check_decoded(messages: list[pb.Dnstap], asked: list[Asked], started: float, ended: float) -> None:
    """Each query's CLIENT_QUERY and CLIENT_RESPONSE, field by field, as the library reads them."""
    for message in messages:
        assert (message.identity, message.version) == (IDENTITY.encode(), VERSION.encode())
    for one in asked:
        (cq,) = of(messages, pb.Message.CLIENT_QUERY, one)
        (cr,) = of(messages, pb.Message.CLIENT_RESPONSE, one)
        protocol = pb.TCP if one.transport == "tcp" else pb.UDP
        for m in (cq, cr):
            assert (m.socket_family, m.socket_protocol) == (pb.INET, protocol), one
            assert m.query_port == cq.query_port > 0
            assert started - 1 <= m.query_time_sec <= ended + 1
            check_policy(m, one)
        assert cq.query_message == one.query.to_wire()  # the query as it came, byte for byte
        assert dns.message.from_wire(cr.response_message) == one.reply  # the answer as it went
        assert (cr.response_time_sec, cr.response_time_nsec) >= (cr.query_time_sec, cr.query_time_nsec)
        assert (cr.query_time_sec, cr.query_time_nsec) == (cq.query_time_sec, cq.query_time_nsec)


def check_readers(out: Path, asked: list[Asked], ports: dict[int, int]) -> None:
    """dnstap-ldns -q/-y and dnstap-read/-y on the file: every query's CQ and CR, from its
    address, over its transport, for its name, with the answer it got."""
    quiet = Counter(ldns_quiet(out))
    for one in asked:
        for kind in ("CQ", "CR"):
            assert quiet[(kind, one.source, one.proto, one.name + ".")] >= 1, (kind, one, quiet)
    bind = Counter(bind_lines(out))
    for one in asked:
        client = f"{one.source}:{ports[one.query.id]}"
        assert bind[("CQ", client, "?", one.proto, f"{one.name}/IN/A")] == 1, (one, bind)
        assert bind[("CR", client, "?", one.proto, f"{one.name}/IN/A")] == 1, (one, bind)

    for tool, text in (
        ("dnstap-ldns", run("dnstap-ldns", "-r", str(out), "-y")),
        ("dnstap-read", run("dnstap-read", "-y", str(out))),
    ):
        documents = yaml_documents(text)
        assert documents and all((d["identity"], d["version"]) == (IDENTITY, VERSION) for d in documents), tool
        by_key = {}
        for d in documents:
            wire = d.get("message.query_message") or d.get("message.response_message") or ""
            by_key[(d["message.type"], d.get("message.query_address"), dns_id(wire))] = d
        for one in asked:
            cq = by_key[("CLIENT_QUERY", one.source, one.query.id)]
            cr = by_key[("CLIENT_RESPONSE", one.source, one.query.id)]
            for d in (cq, cr):
                assert d["message.socket_family"] == "INET", (tool, one)
                assert d["message.socket_protocol"] == one.proto, (tool, one)
                assert d["message.query_port"] == str(ports[one.query.id]), (tool, one)
            assert f";{one.name}." in cq["message.query_message"], (tool, one)
            response = cr["message.response_message"]
            rcode, addresses = EXPECTED[one.kind]
            assert re.search(rf"(rcode|status): {rcode}\b", response), (tool, one, response)
            assert answer_section(response) == [f"{one.name}. 300 IN A {a}" for a in addresses], (tool, one, response)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_fstrm_capture_stream_decoded_by_dnstap_ldns_and_dnstap_read(
    transport: str, tmp_path: Path, site: Callable[..., Site], captures: list[Capture]
) -> None:
    need("fstrm_capture", "dnstap-ldns", "dnstap-read")
    out = tmp_path / "capture.fstrm"
    if transport == "unix":
        capture = Capture(out, unix=tmp_path / "tap.sock")
        target = f'socket = "unix:{tmp_path / "tap.sock"}"'
    else:
        capture = Capture(out, tcp_port=free_port())
        target = f'socket = "tcp:127.0.0.1:{capture.tcp_port}"'
    captures.append(capture.start())
    s = site(target)
    base = s.probe_frames()
    started = time.time()
    asked = ask_every_kind(s.blockd)
    ended = time.time()
    assert not [n for n in s.upstream.names_asked() if n.startswith(("blocked-", "nxdomain-", "refused-"))]

    wait_until(lambda: s.frames("sent") == base + 2 * len(asked), 10, "every frame sent", s.blockd.log)
    assert s.frames("dropped") == 0
    assert s.blockd.stop() == 0  # SIGTERM: blockd sends STOP and waits for FINISH
    assert capture.stop() == 0  # SIGTERM: fstrm_capture finishes the file

    messages = client_messages(dnstap_messages(out))
    assert len(messages) == 2 * len(asked)  # CQ and CR for each query, nothing else
    assert not [m for m in messages if m.message.type not in (pb.Message.CLIENT_QUERY, pb.Message.CLIENT_RESPONSE)]
    check_decoded(messages, asked, started, ended)
    ports = {one.query.id: of(messages, pb.Message.CLIENT_QUERY, one)[0].query_port for one in asked}
    check_readers(out, asked, ports)


def start_unix_capture(tmp_path: Path, captures: list[Capture], name: str = "capture.fstrm") -> Capture:
    capture = Capture(tmp_path / name, unix=tmp_path / "tap.sock").start()
    captures.append(capture)
    return capture


def finish(s: Site, capture: Capture, frames: float) -> list[pb.Dnstap]:
    """Wait for `frames` frames sent, stop blockd then the collector; the clients' messages."""
    wait_until(lambda: s.frames("sent") == frames, 10, f"{frames} frames sent", s.blockd.log)
    assert s.frames("dropped") == 0
    assert s.blockd.stop() == 0
    assert capture.stop() == 0
    return client_messages(dnstap_messages(capture.out))


def test_messages_blocked_sends_only_blocked_monitored_and_refused(
    tmp_path: Path, site: Callable[..., Site], captures: list[Capture]
) -> None:
    need("fstrm_capture", "dnstap-ldns")
    capture = start_unix_capture(tmp_path, captures)
    s = site(f'socket = "unix:{tmp_path / "tap.sock"}"\nmessages = "blocked"')
    asked = ask_every_kind(s.blockd, ("udp",))
    shown = [one for one in asked if one.kind != "forwarded"]
    messages = finish(s, capture, 2 * len(shown))
    # Nothing for the forwarded query, nor for the harness's probe (it is not blocked).
    assert len(messages) == len(dnstap_messages(capture.out)) == 2 * len(shown)
    check_decoded(messages, shown, time.time() - 60, time.time())
    quiet = ldns_quiet(capture.out)
    assert sorted(quiet) == sorted((k, o.source, "UDP", o.name + ".") for o in shown for k in ("CQ", "CR"))
    assert not [row for row in quiet if "forwarded" in row[3]]


def test_messages_responses_sends_only_client_responses(
    tmp_path: Path, site: Callable[..., Site], captures: list[Capture]
) -> None:
    need("fstrm_capture", "dnstap-ldns")
    capture = start_unix_capture(tmp_path, captures)
    s = site(f'socket = "unix:{tmp_path / "tap.sock"}"\nmessages = "responses"')
    base = s.probe_frames()
    asked = ask_every_kind(s.blockd, ("udp", "tcp"))
    messages = finish(s, capture, base + len(asked))
    assert {m.message.type for m in dnstap_messages(capture.out)} == {pb.Message.CLIENT_RESPONSE}
    assert len(messages) == len(asked)
    for one in asked:
        (cr,) = of(messages, pb.Message.CLIENT_RESPONSE, one)
        assert dns.message.from_wire(cr.response_message) == one.reply
        assert cr.query_port > 0 and cr.query_time_sec > 0  # the query's port and time are kept
        check_policy(cr, one)
    quiet = ldns_quiet(capture.out)
    assert {row[0] for row in quiet} == {"CR"}
    assert sorted(row for row in quiet if row[1] != "127.0.0.1") == sorted(
        ("CR", o.source, o.proto, o.name + ".") for o in asked
    )


def test_forwarder_adds_forwarder_query_and_response_with_the_upstream(
    tmp_path: Path, site: Callable[..., Site], captures: list[Capture]
) -> None:
    need("fstrm_capture", "dnstap-ldns", "dnstap-read")
    capture = start_unix_capture(tmp_path, captures)
    s = site(f'socket = "unix:{tmp_path / "tap.sock"}"\nforwarder = true')
    base = s.probe_frames()
    upstream = s.upstream
    asked = ask_every_kind(s.blockd, ("udp",))
    # tc.*: the fake upstream truncates over UDP, so blockd asks again over TCP: four frames.
    asked.append(ask(s.blockd, "forwarded", "tc.example.org", "tcp", 2000, rdtype="TXT"))
    forwarded = [one for one in asked if one.kind in ("forwarded", "monitored")]
    sent_upstream = list(upstream.raw_queries)
    assert len(sent_upstream) == len(forwarded) + 1  # tc.example.org twice: UDP, then TCP
    messages = finish(s, capture, base + 2 * len(asked) + 2 * len(sent_upstream))

    fq = [m.message for m in messages if m.message.type == pb.Message.FORWARDER_QUERY]
    fr = [m.message for m in messages if m.message.type == pb.Message.FORWARDER_RESPONSE]
    assert sorted(m.query_message for m in fq) == sorted(sent_upstream)  # as the upstream got them
    assert len(fr) == len(fq)
    for m in (*fq, *fr):
        assert (m.socket_family, m.response_address, m.response_port) == (pb.INET, packed("127.0.0.1"), upstream.port)
        assert not m.HasField("policy")
    answered = {(m.socket_protocol, m.response_message[:2]): m for m in fr}
    for query in fq:
        response = answered[(query.socket_protocol, query.query_message[:2])]  # the answer has the query's ID
        assert (response.query_time_sec, response.query_time_nsec) == (query.query_time_sec, query.query_time_nsec)
        assert response.response_time_sec >= query.query_time_sec
        question = dns.message.from_wire(query.query_message).question
        assert dns.message.from_wire(response.response_message).question == question
    protocols = [(m.socket_protocol, dns.message.from_wire(m.query_message).question[0].name.to_text()) for m in fq]
    assert (pb.UDP, "tc.example.org.") in protocols and (pb.TCP, "tc.example.org.") in protocols

    # dnstap-ldns -q shows a forwarder message with the upstream's address.
    expected = Counter((k, "127.0.0.1", "UDP", one.name + ".") for one in forwarded for k in ("FQ", "FR"))
    expected.update(
        {("FQ", "127.0.0.1", "TCP", "tc.example.org."): 1, ("FR", "127.0.0.1", "TCP", "tc.example.org."): 1}
    )
    assert Counter(row for row in ldns_quiet(capture.out) if row[0] in ("FQ", "FR")) == expected
    upstream_side = {(row[0], row[2], row[3]) for row in bind_lines(capture.out) if row[0] in ("FQ", "FR")}
    assert ("FQ", f"127.0.0.1:{upstream.port}", "UDP") in upstream_side
    assert ("FR", f"127.0.0.1:{upstream.port}", "TCP") in upstream_side


def names_in(rows: list[tuple[str, str, str, str]], kind: str) -> Counter[str]:
    return Counter(row[3].rstrip(".") for row in rows if row[0] == kind)


def test_collector_killed_and_restarted_mid_stream_loses_no_query(
    tmp_path: Path, site: Callable[..., Site], captures: list[Capture]
) -> None:
    need("fstrm_capture", "dnstap-ldns")
    sock = tmp_path / "tap.sock"
    first = start_unix_capture(tmp_path, captures, "first.fstrm")
    s = site(f'socket = "unix:{sock}"')
    base = s.probe_frames()

    def burst(prefix: str, count: int, qid: int) -> list[str]:
        names = []
        for i in range(count):
            kind = "forwarded" if i % 4 == 0 else "blocked"
            name = f"{prefix}{i}.example.org" if kind == "forwarded" else f"{prefix}{i % 20}.tiktok.com"
            started = time.monotonic()
            ask(s.blockd, kind, name, "tcp" if i % 10 == 0 else "udp", qid + i)
            assert time.monotonic() - started < 1.0, name  # the collector never slows an answer
            names.append(name)
        return names

    burst("before", 200, 1)
    wait_until(lambda: s.frames("sent") - base == 400, 10, "the 200 queries' frames sent", s.blockd.log)

    first.stop(signal.SIGKILL)  # no STOP, no FINISH: the connection just breaks
    # The next batch finds the connection closed (checked before each write): it goes back to the
    # queue, and blockd reconnects.
    during = ["lost.tiktok.com"]
    ask(s.blockd, "blocked", "lost.tiktok.com", "udp", 300)
    wait_until(lambda: s.collector_up() == 0, 10, "blockd noticing the collector gone", s.blockd.log)
    during += burst("during", 60, 400)  # queued while the collector is gone: all answered at once
    assert s.frames("sent") - base == 400 and s.collector_up() == 0

    sock.unlink(missing_ok=True)  # the killed collector's socket file
    second = start_unix_capture(tmp_path, captures, "second.fstrm")
    wait_until(lambda: s.collector_up() == 1, 20, "blockd reconnecting (with backoff)", s.blockd.log)
    after = burst("after", 40, 500)
    sent = 400 + 2 * 61 + 2 * 40
    wait_until(lambda: s.frames("sent") - base == sent, 10, "the queued frames sent", s.blockd.log)
    assert s.frames("dropped") == 0  # the outage's events waited and went
    assert s.blockd.stop() == 0
    assert second.stop() == 0

    rows = ldns_quiet(second.out)
    expected = Counter(during + after)
    assert names_in(rows, "CQ") == expected and names_in(rows, "CR") == expected
    messages = dnstap_messages(second.out)
    assert len(messages) == 2 * (61 + 40)
    log = s.blockd.log()
    assert "reconnecting" in log and log.count("streaming") == 2


def test_queue_full_drops_and_counts_exactly_what_does_not_fit(
    tmp_path: Path, site: Callable[..., Site], captures: list[Capture]
) -> None:
    """No collector at first: blockd keeps 50,000 events and drops (and counts) the rest; once
    a collector comes, the kept ones are delivered, in order."""
    need("fstrm_capture", "dnstap-ldns")
    # 51,000 queries as fast as blockd answers, from one address: a flood to [limits], which are off here.
    s = site(f'socket = "unix:{tmp_path / "tap.sock"}"\nmessages = "blocked"', extra="\n[limits]\nenabled = false\n")
    total = QUEUE_LIMIT + 1000
    wire = dns.message.make_query("www.tiktok.com", "A").to_wire()
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        client.bind((GOV, 0))
        client.setblocking(False)
        sent, deadline = 0, time.monotonic() + 30
        while answered < total and time.monotonic() < deadline:
            while sent < total and sent - answered < 64:  # a window of queries in flight
                client.sendto(struct.pack("!H", sent & 0xFFFF) + wire[2:], ("127.0.0.1", s.blockd.port))
                sent += 1
            if not select.select([client], [], [], 0.5)[0]:
                sent = answered  # a datagram lost on the way: ask again
                continue
            while True:
                try:
                    reply = client.recv(512)
                except BlockingIOError:
                    break
                assert reply.endswith(b"\x00\x04\x00\x00\x00\x00")  # 0.0.0.0
                answered += 1
    assert answered >= total, f"only {answered} answers"
    events = s.metric("blockd_dns_queries_total", group="government")  # what blockd answered
    assert events >= total
    # CQ and CR of each event past the limit, counted when the reactor next encodes (every 10 ms:
    # the last answers may be a tick ahead of the count).
    wait_until(lambda: s.frames("dropped") >= 2 * (events - QUEUE_LIMIT), 5, "the drops counted", s.blockd.log)
    assert s.frames("dropped") == 2 * (events - QUEUE_LIMIT)
    assert s.frames("sent") == 0 and s.collector_up() == 0

    capture = start_unix_capture(tmp_path, captures)
    wait_until(lambda: s.frames("sent") == 2 * QUEUE_LIMIT, 40, "the kept events delivered", s.blockd.log)
    assert s.blockd.stop() == 0
    assert capture.stop() == 0
    payloads, _ = read_stream(capture.out)
    assert len(payloads) == 2 * QUEUE_LIMIT
    rows = ldns_quiet(capture.out)
    assert len(rows) == 2 * QUEUE_LIMIT and {row[3] for row in rows} == {"www.tiktok.com."}
    first, last = pb.Dnstap(), pb.Dnstap()
    first.ParseFromString(payloads[0])
    last.ParseFromString(payloads[-1])
    assert first.message.query_message[:2] == b"\x00\x00"  # the first query asked is kept...
    assert last.message.response_message[:2] == struct.pack("!H", (QUEUE_LIMIT - 1) & 0xFFFF)  # ...the rest dropped


def test_file_output_is_a_frame_streams_file_and_sighup_reopens_it(tmp_path: Path, site: Callable[..., Site]) -> None:
    need("dnstap-ldns")
    has_dnstap_read = shutil.which("dnstap-read") is not None
    path = tmp_path / "tap.fstrm"
    s = site('file = "tap.fstrm"')  # relative: resolved against the config's directory
    base = s.probe_frames()
    assert path.exists()

    def some(prefix: str, qid: int) -> list[Asked]:
        return [
            ask(s.blockd, "blocked", f"{prefix}-udp.tiktok.com", "udp", qid),
            ask(s.blockd, "blocked", f"{prefix}-tcp.tiktok.com", "tcp", qid + 1),
            ask(s.blockd, "forwarded", f"{prefix}.example.org", "udp", qid + 2),
        ]

    stop_frame = struct.pack("!III", 0, 4, 3)

    def reopened(old: Path) -> Callable[[], bool]:
        return lambda: old.read_bytes().endswith(stop_frame)

    one = some("one", 10)
    wait_until(lambda: s.frames("sent") == base + 6, 10, "the first queries written", s.blockd.log)
    rotated = tmp_path / "tap.fstrm.1"
    path.rename(rotated)  # as logrotate does, then SIGHUP
    assert s.blockd.process is not None
    os.kill(s.blockd.process.pid, signal.SIGHUP)
    wait_until(reopened(rotated), 10, "the renamed file closed with STOP", s.blockd.log)
    two = some("two", 20)
    wait_until(lambda: path.exists() and s.frames("sent") == base + 12, 10, "a new file", s.blockd.log)

    # SIGHUP with the file left in place (a config reload, no rotation): the stream goes on in it.
    os.kill(s.blockd.process.pid, signal.SIGHUP)
    wait_until(lambda: "reload succeeded" in s.blockd.log().rsplit("streaming", 1)[-1], 10, "the reload", s.blockd.log)
    three = some("three", 30)
    wait_until(lambda: s.frames("sent") == base + 18, 10, "the third queries written", s.blockd.log)
    assert not path.read_bytes().endswith(stop_frame)
    assert s.blockd.stop() == 0  # the open file gets STOP
    assert not list(tmp_path.glob("tap.fstrm.2*"))  # nothing was moved aside

    for file, asked in ((rotated, one), (path, two + three)):
        messages = client_messages(dnstap_messages(file))  # START ... STOP, unidirectional
        assert len(messages) == 2 * len(asked), file
        check_decoded(messages, asked, time.time() - 60, time.time())
        rows = ldns_quiet(file)
        assert sorted(r for r in rows if r[1] != "127.0.0.1") == sorted(
            (k, a.source, a.proto, a.name + ".") for a in asked for k in ("CQ", "CR")
        ), file
        if has_dnstap_read:
            assert len([r for r in bind_lines(file) if r[1].startswith(GOV)]) == 2 * len(asked)
