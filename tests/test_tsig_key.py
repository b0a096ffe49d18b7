"""blockd.tsig_key: BIND key files, every error with file:line, and the dnspython form."""

from __future__ import annotations

import base64
from pathlib import Path

import dns.name
import dns.tsig
import pytest

from blockd.lists import LineError
from blockd.tsig_key import KeyFileError, TsigKey, load_key_file, parse_key_file, parse_keys, to_dnspython

SECRET = base64.b64encode(bytes(range(32))).decode()
PATH = "keys/rpz.key"


def key_text(name: str = '"rpz-key"', algorithm: str = "hmac-sha256", secret: str = f'"{SECRET}"') -> str:
    return f"key {name} {{\n    algorithm {algorithm};\n    secret {secret};\n}};\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (key_text(), TsigKey("rpz-key", "hmac-sha256", bytes(range(32)))),
        # tsig-keygen's own output, comments of every kind around it
        (
            "# made by tsig-keygen\n// another comment\n/* a\nblock */\n" + key_text(),
            TsigKey("rpz-key", "hmac-sha256", bytes(range(32))),
        ),
        (key_text(name="RPZ-Key."), TsigKey("rpz-key", "hmac-sha256", bytes(range(32)))),
        (key_text(algorithm="HMAC-SHA512"), TsigKey("rpz-key", "hmac-sha512", bytes(range(32)))),
        (key_text(algorithm="hmac-sha384"), TsigKey("rpz-key", "hmac-sha384", bytes(range(32)))),
        (key_text(name='"transfer.example.gov"'), TsigKey("transfer.example.gov", "hmac-sha256", bytes(range(32)))),
        # everything on one line, secret before algorithm
        (f'key k {{ secret "{SECRET}"; algorithm hmac-sha256; }};', TsigKey("k", "hmac-sha256", bytes(range(32)))),
        # whitespace inside the base64 is allowed (long secrets get wrapped)
        (key_text(secret=f'"{SECRET[:20]} {SECRET[20:]}"'), TsigKey("rpz-key", "hmac-sha256", bytes(range(32)))),
        # a trailing comment on a line
        (
            key_text().replace("hmac-sha256;", "hmac-sha256; # the default"),
            TsigKey("rpz-key", "hmac-sha256", bytes(range(32))),
        ),
    ],
)
def test_valid_key_files(text: str, expected: TsigKey) -> None:
    assert parse_key_file(text, PATH) == expected


@pytest.mark.parametrize(
    ("text", "errors"),
    [
        ("", [(0, "no key statement in the file")]),
        ("# only a comment\n", [(0, "no key statement in the file")]),
        (
            key_text() + key_text(name='"second"'),
            [(5, "one key per file, found 2: 'rpz-key' on line 1, 'second' on line 5")],
        ),
        (
            key_text(algorithm="hmac-sha1"),
            [(2, "algorithm hmac-sha1: hmac-sha1 is refused; use hmac-sha256 or stronger")],
        ),
        (key_text(algorithm="hmac-md5"), [(2, "hmac-md5 is broken and refused")]),
        (key_text(algorithm="hmac-sha224"), [(2, "algorithm 'hmac-sha224' is not supported")]),
        (key_text(secret='"not base64!"'), [(3, "secret is not valid base64")]),
        (key_text(secret='""'), [(3, "secret is empty")]),
        ('key "k" {\n  algorithm hmac-sha256;\n};\n', [(1, "key has no secret")]),
        (f'key "k" {{\n  secret "{SECRET}";\n}};\n', [(1, "key has no algorithm")]),
        (
            key_text().replace("secret", "algorithm hmac-sha256;\n    secret"),
            [(3, "algorithm given twice (first on line 2)")],
        ),
        (key_text().replace("    secret", "    owner nobody;\n    secret"), [(3, "unknown clause 'owner'")]),
        (key_text().replace("hmac-sha256;", "hmac-sha256"), [(2, "expected ';' after algorithm 'hmac-sha256'")]),
        (key_text().replace("};", "}"), [(4, "expected ';' after '}'")]),
        (
            'options { directory "/var"; };\n' + key_text(),
            [(1, "unexpected 'options': a key file holds only key statements")],
        ),
        (key_text().replace('"rpz-key"', '"bad..name"'), [(1, "invalid key name 'bad..name'")]),
        ('key "rpz-key" {\n  algorithm hmac-sha256;\n', [(1, "key statement not closed with '};'")]),
        ("/* never closed\n" + key_text(), [(1, "unterminated /* comment")]),
        ('key "rpz-key {\n', [(1, "unterminated quoted string")]),
        # two errors in one file: both reported, in line order
        (key_text(algorithm="hmac-sha1", secret='"%%%"'), [(2, "hmac-sha1 is refused"), (3, "not valid base64")]),
    ],
)
def test_invalid_key_files_name_file_and_line(text: str, errors: list[tuple[int, str]]) -> None:
    with pytest.raises(KeyFileError) as raised:
        parse_key_file(text, PATH)
    got = raised.value.errors
    assert [error.line for error in got] == [line for line, _ in errors], got
    for error, (_line, message) in zip(got, errors, strict=True):
        assert isinstance(error, LineError)
        assert error.path == PATH
        assert message in error.message
    assert str(raised.value).startswith(f"{PATH}:")


def test_parse_keys_returns_every_key_with_its_line() -> None:
    keys, errors = parse_keys(key_text() + "\n" + key_text(name="other"), PATH)
    assert errors == []
    assert [(key.name, line) for key, line in keys] == [("rpz-key", 1), ("other", 6)]


def test_the_secret_never_shows_in_repr() -> None:
    key = parse_key_file(key_text(), PATH)
    assert SECRET not in repr(key)
    assert repr(bytes(range(32))) not in repr(key)


def test_load_key_file(tmp_path: Path) -> None:
    path = tmp_path / "rpz.key"
    path.write_text(key_text())
    assert load_key_file(path) == TsigKey("rpz-key", "hmac-sha256", bytes(range(32)))


def test_load_key_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(KeyFileError) as raised:
        load_key_file(missing)
    assert str(raised.value) == f"{missing}: cannot read the key file: No such file or directory"
    bad = tmp_path / "bad.key"
    bad.write_text(key_text(algorithm="hmac-sha1"))
    with pytest.raises(KeyFileError) as raised:
        load_key_file(bad)
    assert str(raised.value).startswith(f"{bad}:2: algorithm hmac-sha1")


def test_to_dnspython() -> None:
    key = to_dnspython(TsigKey("rpz-key", "hmac-sha512", b"secret"))
    assert isinstance(key, dns.tsig.Key)
    assert key.name == dns.name.from_text("rpz-key.")
    assert key.algorithm == dns.tsig.HMAC_SHA512
    assert key.secret == b"secret"
