"""`blockd check`: every error named, at most 20 per file, key files and RPZ files read too."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockd import cli

CONFIG = """
[upstream]
servers = ["127.0.0.1:5399"]
[lists.big]
path = "big.txt"
[lists.gov-rpz]
path = "gov.rpz"
[lists.feed]
zone = "rpz.feed.example"
primaries = ["127.0.0.1:5300"]
tsig = "feed.key"
[groups.gov]
networks = ["10.0.0.0/8"]
lists = ["big", "gov-rpz", "feed"]
"""

ZONE = """$ORIGIN rpz.gov.example.
@ 300 SOA ns.gov.example. hostmaster.gov.example. 1 3600 600 86400 60
tiktok.com CNAME .
*.tiktok.com CNAME .
"""

KEY = 'key "feed-key" {\n  algorithm hmac-sha256;\n  secret "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0cw==";\n};\n'


def write(directory: Path, big: str, key: str = KEY, zone: str = ZONE) -> Path:
    (directory / "big.txt").write_text(big)
    (directory / "gov.rpz").write_text(zone)
    (directory / "feed.key").write_text(key)
    config = directory / "blockd.toml"
    config.write_text(CONFIG)
    return config


def test_a_good_config_with_rpz_and_key_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--config", str(write(tmp_path, "tiktok.com\n"))]) == 0
    out = capsys.readouterr().out
    assert "list gov-rpz: 2 domains" in out and "list big: 1 domains" in out


def test_a_file_of_the_wrong_format_prints_twenty_errors_and_a_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = "".join(f"not a domain {index}\n" for index in range(1000))
    assert cli.main(["check", "--config", str(write(tmp_path, big))]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 21
    assert lines[0].startswith(f"{tmp_path / 'big.txt'}:1: ")
    assert lines[-1] == f"{tmp_path / 'big.txt'}: ... and 980 more errors"


def test_bad_key_and_zone_files_are_named_with_their_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, "tiktok.com\n", key='key "k" {\n  algorithm md5;\n};\n', zone=ZONE + "bad line here\n")
    assert cli.main(["check", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'gov.rpz'}:5: " in err
    assert f"{tmp_path / 'feed.key'}:" in err


@pytest.mark.parametrize(
    ("limit", "errors", "expected"),
    [
        (2, ["a.txt:1: x", "a.txt:2: y"], ["a.txt:1: x", "a.txt:2: y"]),
        (1, ["a.txt:1: x", "b.txt:1: y", "a.txt:2: z"], ["a.txt:1: x", "b.txt:1: y", "a.txt: ... and 1 more errors"]),
        (
            1,
            ["cfg.toml: lists.x: a", "cfg.toml: groups.y: b"],
            ["cfg.toml: lists.x: a", "cfg.toml: ... and 1 more errors"],
        ),
    ],
)
def test_cap_per_file(limit: int, errors: list[str], expected: list[str]) -> None:
    assert cli.cap_per_file(errors, limit) == expected


def test_published_zones_are_rendered_and_their_key_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, "tiktok.com\np16-tiktok-*.ibyteimg.com\n")
    config.write_text(
        CONFIG
        + '[publish]\nlisten = "127.0.0.1:5300"\ntsig = "publish.key"\n'
        + '[publish.zones."rpz.gov.example."]\ngroup = "gov"\n'
    )
    (tmp_path / "publish.key").write_text("key broken {")
    assert cli.main(["check", "--config", str(config)]) == 1
    assert "publish.key:1:" in capsys.readouterr().err
    (tmp_path / "publish.key").write_text(KEY)
    assert cli.main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    # tiktok.com and *.tiktok.com, sinkholed (A and AAAA each; the first list wins over the RPZ
    # file's CNAME .), and the built-in escape hatches (4 names, a CNAME for each and its *.).
    line = "publish zone rpz.gov.example: 12 records; 1 entries without an RPZ form, e.g. p16-tiktok-*.ibyteimg.com"
    assert line in out
