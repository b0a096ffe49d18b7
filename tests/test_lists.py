"""blockd.lists: every accepted line format, every refused one, and the shipped domain files."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockd.lists import DomainList, LineError, ListLoadError, load_list, parse_line, parse_lines
from blockd.matcher import DomainIndex
from blockd.names import InvalidNameError, normalize

REPO = Path(__file__).resolve().parent.parent
DOMAINS = REPO / "domains"
PREFIX_FILES = {"bytedance-prefixes.txt"}


def write(tmp_path: Path, text: str | bytes, name: str = "list.txt") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_bytes(text.encode("utf-8"))
    return path


def load_text(tmp_path: Path, text: str | bytes) -> frozenset[str]:
    return load_list("test", write(tmp_path, text)).domains


def errors_of(tmp_path: Path, text: str | bytes) -> list[LineError]:
    path = write(tmp_path, text)
    with pytest.raises(ListLoadError) as info:
        load_list("test", path)
    return info.value.errors


# --- accepted formats ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("tiktok.com", ["tiktok.com"]),
        ("  tiktok.com  ", ["tiktok.com"]),
        ("\ttiktok.com\t", ["tiktok.com"]),
        ("sub.tiktok.com", ["sub.tiktok.com"]),
        ("_dmarc.example.com", ["_dmarc.example.com"]),
        ("xn--bcher-kva.de", ["xn--bcher-kva.de"]),
        ("a-b.example", ["a-b.example"]),
        ("0.0.0.0 tiktok.com", ["tiktok.com"]),
        ("127.0.0.1 tiktok.com", ["tiktok.com"]),
        ("0.0.0.0\ttiktok.com", ["tiktok.com"]),
        ("0.0.0.0 tiktok.com tiktokv.com  musical.ly", ["tiktok.com", "tiktokv.com", "musical.ly"]),
        (":: tiktok.com", ["tiktok.com"]),
        ("::1 tiktok.com tiktokv.com", ["tiktok.com", "tiktokv.com"]),
        ("2001:db8::1 tiktok.com", ["tiktok.com"]),
        ("fe80::1%lo0 tiktok.com", ["tiktok.com"]),
        ("||tiktok.com^", ["tiktok.com"]),
        ("||*.tiktok.com^", ["tiktok.com"]),
        ("||TikTok.COM^", ["tiktok.com"]),
        ("*.tiktok.com", ["tiktok.com"]),
        ("tiktok.com.", ["tiktok.com"]),
        ("0.0.0.0 tiktok.com.", ["tiktok.com"]),
        ("||tiktok.com.^", ["tiktok.com"]),
        ("TIKTOK.COM", ["tiktok.com"]),
        ("TikTok.Com", ["tiktok.com"]),
        ("bücher.de", ["xn--bcher-kva.de"]),
        ("BÜCHER.de", ["xn--bcher-kva.de"]),
        ("bücher.de.", ["xn--bcher-kva.de"]),
        ("||bücher.de^", ["xn--bcher-kva.de"]),
        ("0.0.0.0 bücher.de", ["xn--bcher-kva.de"]),
        ("例え.テスト", ["xn--r8jz45g.xn--zckzah"]),
        ("tiktok.com # inline comment", ["tiktok.com"]),
        ("tiktok.com\t# inline comment", ["tiktok.com"]),
        ("0.0.0.0 tiktok.com # inline comment", ["tiktok.com"]),
        ("||tiktok.com^ # inline comment", ["tiktok.com"]),
        ("tiktok.com\r\n", ["tiktok.com"]),
        ("tiktok.com\n", ["tiktok.com"]),
    ],
)
def test_parse_line_accepts(line: str, expected: list[str]) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "\t",
        "\r\n",
        "# a comment",
        "#tiktok.com",
        "   # indented comment",
        "! adblock comment",
        "!tiktok.com",
        "[Adblock Plus 2.0]",
        "[Adblock Plus]",
        "  [Adblock Plus 2.0]  ",
    ],
)
def test_parse_line_ignores(line: str) -> None:
    assert parse_line(line) == []


@pytest.mark.parametrize(
    "line",
    [
        "127.0.0.1 localhost",
        "127.0.0.1 localhost.localdomain localhost",
        "127.0.1.1 localhost",
        "::1 localhost ip6-localhost ip6-loopback",
        "::1 LOCALHOST",
        "fe00::0 ip6-localnet",
        "ff00::0 ip6-mcastprefix",
        "ff02::1 ip6-allnodes",
        "ff02::2 ip6-allrouters",
        "ff02::3 ip6-allhosts",
        "255.255.255.255 broadcasthost",
        "0.0.0.0 0.0.0.0",
        "0.0.0.0 local",
        "fe80::1%lo0 localhost",
    ],
)
def test_hosts_boilerplate_is_skipped(line: str) -> None:
    assert parse_line(line) == []


def test_hosts_boilerplate_skipped_but_other_names_kept() -> None:
    assert parse_line("127.0.0.1 localhost tiktok.com") == ["tiktok.com"]


def test_a_whole_hosts_file(tmp_path: Path) -> None:
    text = (
        "# /etc/hosts style block list\n"
        "127.0.0.1 localhost\n"
        "127.0.0.1 localhost.localdomain\n"
        "255.255.255.255 broadcasthost\n"
        "::1 localhost ip6-localhost ip6-loopback\n"
        "fe80::1%lo0 localhost\n"
        "0.0.0.0 0.0.0.0\n"
        "\n"
        "0.0.0.0 tiktok.com\n"
        "0.0.0.0 www.tiktok.com m.tiktok.com\n"
        ":: tiktokv.com\n"
    )
    assert load_text(tmp_path, text) == {"tiktok.com", "www.tiktok.com", "m.tiktok.com", "tiktokv.com"}


def test_every_format_mixed_in_one_file(tmp_path: Path) -> None:
    text = (
        "[Adblock Plus 2.0]\r\n"
        "! Title: test\r\n"
        "# comment\r\n"
        "\r\n"
        "plain.example\r\n"
        "0.0.0.0 hosts.example hosts2.example\r\n"
        "::1 hosts6.example\r\n"
        "||adblock.example^\r\n"
        "*.wild.example\r\n"
        "inline.example # why it is listed\r\n"
        "Upper.EXAMPLE.\r\n"
        "bücher.example\r\n"
        "   \r\n"
        "plain.example\r\n"
    )
    result = load_list("mixed", write(tmp_path, text))
    assert isinstance(result, DomainList)
    assert result.name == "mixed"
    assert result.domains == {
        "plain.example",
        "hosts.example",
        "hosts2.example",
        "hosts6.example",
        "adblock.example",
        "wild.example",
        "inline.example",
        "upper.example",
        "xn--bcher-kva.example",
    }


def test_crlf_and_lf_give_the_same_result(tmp_path: Path) -> None:
    lines = ["a.example", "0.0.0.0 b.example", "||c.example^", "# c", ""]
    lf = load_list("a", write(tmp_path, "\n".join(lines), "lf.txt")).domains
    crlf = load_list("b", write(tmp_path, "\r\n".join(lines), "crlf.txt")).domains
    assert lf == crlf == {"a.example", "b.example", "c.example"}


def test_empty_and_comment_only_files_give_no_entries(tmp_path: Path) -> None:
    assert load_text(tmp_path, "") == frozenset()
    assert load_text(tmp_path, "# nothing\n! here\n\n[Adblock Plus 2.0]\n") == frozenset()


def test_display_path_is_used(tmp_path: Path) -> None:
    path = write(tmp_path, "ok.example\nbad..example\n")
    with pytest.raises(ListLoadError) as info:
        load_list("x", path, display_path="lists/x.txt")
    assert [str(e).split(":")[:2] for e in info.value.errors] == [["lists/x.txt", "2"]]
    assert load_list("x", write(tmp_path, "ok.example\n"), display_path="shown").path == "shown"


def test_label_and_name_length_limits_accepted() -> None:
    label63 = "a" * 63
    assert parse_line(f"{label63}.example") == [f"{label63}.example"]
    name253 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name253) == 253
    assert parse_line(name253) == [name253]
    assert parse_line(name253 + ".") == [name253]


# --- refused lines ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("tik tok.com", "expected one domain per line"),
        ("tiktok.com tiktokv.com", "expected one domain per line"),
        ("block tiktok.com", "expected one domain per line"),
        ("tik!tok.com", "invalid character"),
        ("tiktok.com/path", "invalid character"),
        ("https://tiktok.com", "invalid character"),
        ("tik@tok.com", "invalid character"),
        ("-tiktok.com", "invalid character"),
        ("tiktok-.com", "invalid character"),
        ("a..b", "empty label"),
        ("a..b.example", "empty label"),
        (".tiktok.com", "empty label"),
        ("tiktok.com..", "empty label"),
        ("a" * 64 + ".example", "label longer than 63"),
        (".".join(["a" * 63] * 4), "longer than 253"),
        (".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62]), "longer than 253"),
        ("com", "top-level domain"),
        ("COM.", "top-level domain"),
        ("*.com", "top-level domain"),
        ("||com^", "top-level domain"),
        ("0.0.0.0 com", "top-level domain"),
        ("1.2.3.4", "looks like an IP address"),
        ("0.0.0.0", "looks like an IP address"),
        ("10.0.0.1.", "looks like an IP address"),
        ("0.0.0.0 1.2.3.4", "looks like an IP address"),
        ("||1.2.3.4^", "looks like an IP address"),
        ("::1", "invalid character"),
        ("@@tiktok.com", "only '@@||name^' exception rules"),
        ("||tiktok.com^$dnstype=AAAA", "adblock modifier $dnstype changes the block"),
        ("||tiktok.com$important", "must end with '^'"),
        ("||tiktok.com", "must end with '^'"),
        ("||tiktok.com^|", "must end with '^'"),
        ("||tiktok.com/", "must end with '^'"),
        ("tiktok.*.com", "wildcards are only supported as a leading"),
        ("*tiktok.com", "wildcards are only supported as a leading"),
        ("tiktok.com.*", "wildcards are only supported as a leading"),
        ("*.*.tiktok.com", "wildcards are only supported as a leading"),
        ("||tik*tok.com^", "wildcards are only supported as a leading"),
        ("*", "wildcards are only supported as a leading"),
        ("b\u00fc..de", "invalid internationalised name"),
    ],
)
def test_parse_line_refuses(line: str, fragment: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        parse_line(line)
    assert fragment in str(info.value)


def test_errors_are_path_line_message(tmp_path: Path) -> None:
    path = write(tmp_path, "good.example\nbad..example\n")
    errors = errors_of(tmp_path, "good.example\nbad..example\n")
    assert len(errors) == 1
    assert errors[0] == LineError(str(path), 2, "empty label in 'bad..example'")
    assert str(errors[0]) == f"{path}:2: empty label in 'bad..example'"


def test_every_error_in_a_file_is_reported(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "# header",  # 1
            "ok.example",  # 2
            "bad!name.example",  # 3
            "a..b",  # 4
            "a" * 64 + ".example",  # 5
            ".".join(["a" * 63] * 4),  # 6
            "com",  # 7
            "1.2.3.4",  # 8
            "@@ok.example",  # 9
            "||ok.example^$denyallow=a.example",  # 10
            "||ok.example",  # 11
            "ok.*.example",  # 12
            "two fields",  # 13
            "",  # 14
            "also-ok.example",  # 15
            "bad name here",  # 16
        ]
    )
    path = write(tmp_path, text)
    with pytest.raises(ListLoadError) as info:
        load_list("test", path)
    errors = info.value.errors
    assert [e.line for e in errors] == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16]
    assert all(e.path == str(path) for e in errors)
    for error in errors:
        assert str(error).startswith(f"{path}:{error.line}: ")
    # The exception message carries every error too, one per line.
    assert str(info.value).splitlines() == [str(e) for e in errors]


def test_error_line_numbers_count_crlf_lines(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "a.example\r\nb.example\r\n\r\nbad..x\r\n")
    assert [e.line for e in errors] == [4]


def test_a_list_with_any_error_is_refused_whole(tmp_path: Path) -> None:
    with pytest.raises(ListLoadError):
        load_list("t", write(tmp_path, "fine.example\n" * 100 + "a..b\n"))


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, b"ok.example\nb\xfccher.de\n")
    with pytest.raises(ListLoadError) as info:
        load_list("test", path)
    errors = info.value.errors
    assert len(errors) == 1
    assert errors[0].path == str(path)
    assert errors[0].message == "not UTF-8 text: invalid byte 0xfc"
    assert errors[0].line == 2
    assert str(errors[0]) == f"{path}:2: {errors[0].message}"


def test_non_utf8_lines_and_bad_names_are_all_reported(tmp_path: Path) -> None:
    path = write(tmp_path, b"a..b\nok.example\n\xff\xfe.example\nc..d\nlatin1-\xe9.example\n")
    with pytest.raises(ListLoadError) as info:
        load_list("test", path)
    errors = info.value.errors
    assert [e.line for e in errors] == [1, 3, 4, 5]
    assert errors[1].message == "not UTF-8 text: invalid byte 0xff"
    assert errors[3].message == "not UTF-8 text: invalid byte 0xe9"
    assert "empty label" in errors[0].message
    assert "empty label" in errors[2].message


def test_utf8_bom_is_not_an_error(tmp_path: Path) -> None:
    assert load_text(tmp_path, "\ufefftiktok.com\nmusical.ly\n") == {"tiktok.com", "musical.ly"}


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist.txt"
    with pytest.raises(ListLoadError) as info:
        load_list("missing", path)
    errors = info.value.errors
    assert len(errors) == 1
    assert errors[0].path == str(path)
    assert "cannot read list" in errors[0].message
    assert "No such file" in errors[0].message
    assert str(errors[0]).startswith(f"{path}: ")


def test_directory_instead_of_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ListLoadError) as info:
        load_list("dir", tmp_path)
    assert "cannot read list" in info.value.errors[0].message


def test_parse_lines_collects_without_raising() -> None:
    domains, errors = parse_lines(["a.example", "a..b", "||c.example^", "com"], "mem")
    assert domains == {"a.example", "c.example"}
    assert [(e.path, e.line) for e in errors] == [("mem", 2), ("mem", 4)]


def test_line_error_without_line_number() -> None:
    assert str(LineError("x.txt", 0, "cannot read list")) == "x.txt: cannot read list"
    assert str(LineError("x.txt", 7, "bad")) == "x.txt:7: bad"


def test_normalize_is_idempotent_on_list_output() -> None:
    for line in ["BÜCHER.de.", "||TikTok.COM^", "*.Example.ORG"]:
        (key,) = parse_line(line)
        assert normalize(key) == key


# --- the shipped lists -----------------------------------------------------------------------

SHIPPED = sorted(p for p in DOMAINS.glob("*.txt") if p.name not in PREFIX_FILES)


def test_shipped_lists_are_found() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"tiktok", "bytedance", "doh-bypass", "lark-feishu", "volcengine-byteplus"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_list_parses_cleanly(path: Path) -> None:
    result = load_list(path.stem, path)
    assert len(result.domains) >= 20
    for key in result.domains:
        assert normalize(key) == key
        assert "." in key


def test_shipped_list_sizes() -> None:
    sizes = {p.stem: len(load_list(p.stem, p).domains) for p in SHIPPED}
    assert sizes["tiktok"] >= 100
    assert sizes["bytedance"] >= 500
    assert sizes["doh-bypass"] >= 40
    assert sizes["lark-feishu"] >= 50
    assert sizes["volcengine-byteplus"] >= 200


def test_shipped_tiktok_list_has_the_core_names() -> None:
    domains = load_list("tiktok", DOMAINS / "tiktok.txt").domains
    assert {"tiktok.com", "tiktokv.com", "musical.ly", "tiktokcdn.com"} <= domains


def test_high_collateral_groups_are_not_in_bytedance_list() -> None:
    bytedance = load_list("bytedance", DOMAINS / "bytedance.txt").domains
    lark = load_list("lark-feishu", DOMAINS / "lark-feishu.txt").domains
    volc = load_list("volcengine-byteplus", DOMAINS / "volcengine-byteplus.txt").domains
    for name in ("larksuite.com", "feishu.cn", "volcengine.com", "byteplus.com"):
        assert name not in bytedance
    assert "larksuite.com" in lark
    assert "volcengine.com" in volc
    assert not (bytedance & lark)
    assert not (bytedance & volc)


def test_high_collateral_names_are_not_blocked_by_the_default_lists() -> None:
    # Not listed by name, and not covered through a listed parent either.
    defaults = [load_list(n, DOMAINS / f"{n}.txt") for n in ("tiktok", "bytedance", "doh-bypass")]
    index = DomainIndex(defaults)
    mask = index.mask_for([d.name for d in defaults])
    order = list(range(len(defaults)))
    for extra in ("lark-feishu", "volcengine-byteplus"):
        for key in load_list(extra, DOMAINS / f"{extra}.txt").domains:
            assert index.lookup(key, mask, order) is None, key
            assert index.lookup("www." + key, mask, order) is None, key
