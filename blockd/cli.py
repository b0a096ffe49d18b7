"""The `blockd` command: run, check, reload."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blockd import __version__
from blockd.config import ConfigError, load_config
from blockd.policy import PolicyError, build_policy, load_lists


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="blockd", description="DNS sinkhole for TikTok/ByteDance on government networks."
    )
    parser.add_argument("--version", action="version", version=f"blockd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", type=Path, help="TOML config file (default: the embedded default)")
    check = commands.add_parser("check", help="validate the config and every list, print every error")
    check.add_argument("--config", type=Path, help="TOML config file (default: the embedded default)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check_command(args.config)
    if args.command == "run":
        return run_command(args.config)
    return 2


def check_command(path: Path | None) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    lists, errors = load_lists(config)
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        return 1
    total = sum(len(lst.domains) for lst in lists.values())
    print(f"{config.source}: OK: {len(config.groups)} groups, {len(lists)} lists, {total} domains")
    for lst in lists.values():
        print(f"  list {lst.name}: {len(lst.domains)} domains from {lst.path}")
    return 0


def run_command(path: Path | None) -> int:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from blockd.daemon import Daemon, StartupError

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    try:
        config = load_config(path)
        policy = build_policy(config)
    except (ConfigError, PolicyError) as exc:
        for line in exc.errors:
            print(f"blockd: {line}", file=sys.stderr)
        print("blockd: refusing to start", file=sys.stderr)
        return 1
    daemon = Daemon(reactor, config, policy)
    try:
        daemon.start()
    except StartupError as exc:
        print(f"blockd: {exc}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stop)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
