"""Retiring a policy snapshot: emptied in steps, never touching what the serving one shares."""

from __future__ import annotations

from pathlib import Path

from blockd.config import parse_config
from blockd.policy import build_policy, dismantle


def config_text(lists: Path) -> str:
    return (
        '[upstream]\nservers = ["127.0.0.1:9"]\n'
        f'[lists.same]\npath = "{lists / "same.txt"}"\n'
        f'[lists.changing]\npath = "{lists / "changing.txt"}"\n'
        '[groups.g]\nnetworks = ["10.0.0.0/8"]\nlists = ["same", "changing"]\n'
    )


def test_dismantle_empties_only_what_the_serving_policy_does_not_share(tmp_path: Path) -> None:
    (tmp_path / "same.txt").write_text("".join(f"s{i}.example\n" for i in range(50_000)))
    (tmp_path / "changing.txt").write_text("old.example\n")
    config = parse_config(config_text(tmp_path), "t.toml", tmp_path)
    old = build_policy(config)
    (tmp_path / "changing.txt").write_text("new.example\nold.example\n")
    new = build_policy(config, previous=old)
    assert new.lists["same"].domains is old.lists["same"].domains  # unchanged file: reused

    dismantle(old, new)

    assert len(old.index) == 0
    assert not old.lists["changing"].domains
    assert len(new.lists["same"].domains) == 50_000
    group = new.groups["g"]
    assert new.check(group, "www.s49999.example") is not None
    assert new.check(group, "new.example") is not None


def test_a_monitor_match_does_not_hide_a_blocked_cname(tmp_path: Path) -> None:
    from blockd.upstream_answer import AnswerInfo

    (tmp_path / "watch.txt").write_text("cdn.example\n")
    (tmp_path / "tiktok.txt").write_text("tiktok.com\n")
    text = (
        '[upstream]\nservers = ["127.0.0.1:9"]\n'
        f'[lists.watch]\npath = "{tmp_path / "watch.txt"}"\naction = "monitor"\n'
        f'[lists.tiktok]\npath = "{tmp_path / "tiktok.txt"}"\n'
        '[groups.gov]\nnetworks = ["10.0.0.0/8"]\nlists = ["watch", "tiktok"]\n'
    )
    policy = build_policy(parse_config(text, "t.toml", tmp_path))
    info = AnswerInfo(0, ("x.cdn.example", "www.tiktok.com"), (), (), (), 300)
    verdict = policy.check_answer(policy.groups["gov"], info)
    assert verdict is not None and verdict.blocks and verdict.list_name == "tiktok"
    only_monitored = AnswerInfo(0, ("x.cdn.example", "edge.example.net"), (), (), (), 300)
    monitored = policy.check_answer(policy.groups["gov"], only_monitored)
    assert monitored is not None and not monitored.blocks and monitored.list_name == "watch"
