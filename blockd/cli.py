"""The `blockd` command: run, check, reload, export, explain, kit."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from blockd import __version__
from blockd.config import Config, ConfigError, load_config
from blockd.explain import ExplainError, explain, parse_qtype
from blockd.explain import render as render_explanation
from blockd.policy import Policy, PolicyError, build_policy, load_egress_prefixes, load_lists, load_prefix_sets
from blockd.validator_export import FORMATS, listed_names
from blockd.validator_export import render as render_export


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
    reload = commands.add_parser("reload", help="make the running daemon reload, and report the outcome")
    reload.add_argument("--pidfile", type=Path, help="the daemon's pidfile (default: server.pidfile of --config)")
    reload.add_argument("--config", type=Path, help="config file to read server.pidfile from")
    reload.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the outcome")
    export = commands.add_parser(
        "export", help="print the validator settings (Unbound, BIND) that accept blockd's answers for listed names"
    )
    export.add_argument("--format", required=True, choices=FORMATS, help="the validator's configuration syntax")
    export.add_argument("--config", type=Path, help="TOML config file (default: the embedded default)")
    explain = commands.add_parser(
        "explain", help="say which group, list, entry and action apply to a name (exit 0 blocked, 1 not, 2 error)"
    )
    explain.add_argument("name", help="the domain name")
    explain.add_argument("--client", default="127.0.0.1", help="the asking client's address (default 127.0.0.1)")
    explain.add_argument("--qtype", default="A", help="the question's type (default A)")
    explain.add_argument("--config", type=Path, help="TOML config file (default: the embedded default)")
    kit = commands.add_parser(
        "kit", help="write the deploy kit (unit for this installation, example config, lists, alerts) into DIR"
    )
    kit.add_argument("dir", type=Path, help="directory to write into (created if missing)")
    kit.add_argument("--force", action="store_true", help="overwrite files that exist")
    kit.add_argument("--blockd", type=Path, help="the blockd the unit runs (default: this installation's)")
    args = parser.parse_args(argv)
    if args.command == "kit":
        from blockd.kit import kit_command

        return kit_command(args.dir, args.force, args.blockd)
    if args.command == "explain":
        return explain_command(args.config, args.name, args.client, args.qtype)
    if args.command == "check":
        return check_command(args.config)
    if args.command == "export":
        return export_command(args.config, args.format)
    if args.command == "run":
        return run_command(args.config)
    return reload_command(args.pidfile, args.config, args.timeout)


def _config_or_errors(path: Path | None) -> Config | None:
    """The config, or None once its errors are printed (one per line, by key)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def check_command(path: Path | None) -> int:
    config = _config_or_errors(path)
    if config is None:
        return 1
    lists, errors = load_lists(config)
    prefix_sets, prefix_errors = load_prefix_sets(config)
    errors += prefix_errors
    egress_prefixes, egress_errors = load_egress_prefixes(config)
    errors += egress_errors
    errors += key_file_errors(config)
    for line in cap_per_file(errors):
        print(line, file=sys.stderr)
    if errors:
        return 1
    total = sum(len(lst) for lst in lists.values())
    print(f"{config.source}: OK: {len(config.groups)} groups, {len(lists)} lists, {total} domains")
    for lst in lists.values():
        note = lst.ignored_note()
        print(f"  list {lst.name}: {len(lst)} domains from {lst.path}" + (f"; {note}" if note else ""))
    if config.egress.enabled:
        files = ", ".join(str(p) for p in config.egress.prefixes) or "no prefix files"
        print(f"  egress: {len(egress_prefixes)} prefixes from {files}")
    if config.publish.zones:
        _print_published(Policy(config, lists, prefix_sets, egress_prefixes))
    return 0


def _print_published(policy: Policy) -> None:
    """What [publish] would serve: each zone rendered as the daemon renders it."""
    from blockd.publish_journal import zone_digest
    from blockd.publish_zone import render

    for zone_config in policy.config.publish.zones.values():
        content = render(policy, zone_config)
        records = zone_digest(content.zone)[1]
        line = f"  publish zone {zone_config.name}: {records} records"
        if content.unpublishable:
            line += f"; {content.unpublishable} entries without an RPZ form, e.g. {', '.join(content.sample)}"
        print(line)


def export_command(path: Path | None, fmt: str) -> int:
    """The validator lines for the listed names (blockd.validator_export); errors as `check` says them."""
    config = _config_or_errors(path)
    if config is None:
        return 1
    lists, errors = load_lists(config)
    for line in cap_per_file(errors):
        print(line, file=sys.stderr)
    if errors:
        return 1
    sys.stdout.write(render_export(listed_names(config, lists), fmt, config.source))
    return 0


def explain_command(path: Path | None, name: str, client: str, qtype_text: str) -> int:
    """The real policy code on the config and lists: 0 blocked, 1 not blocked, 2 on an error."""
    config = _config_or_errors(path)
    if config is None:
        return 2
    try:
        policy = build_policy(config)
        explanation = explain(policy, name, client, parse_qtype(qtype_text))
    except PolicyError as exc:
        for line in cap_per_file(exc.errors):
            print(line, file=sys.stderr)
        return 2
    except ExplainError as exc:
        print(f"blockd explain: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_explanation(explanation))
    return 0 if explanation.blocked else 1


ERRORS_PER_FILE = 20


def cap_per_file(errors: list[str], limit: int = ERRORS_PER_FILE) -> list[str]:
    """At most `limit` errors per file, then how many more: a file of the wrong format must not
    print 100,000 lines.  Errors read "file:line: message" or "file: message"."""
    shown: list[str] = []
    counts: dict[str, int] = {}
    for line in errors:
        source = _error_source(line)
        more = _more_count(line, source)  # a parser's own cap (blockd.lists.LineErrors) counts on
        counts[source] = counts.get(source, 0) + (more or 1)
        if not more and counts[source] <= limit:
            shown.append(line)
    shown += [f"{source}: ... and {n - limit} more errors" for source, n in counts.items() if n > limit]
    return shown


def _more_count(line: str, source: str) -> int:
    """N of a "file: ... and N more errors" line, else 0."""
    count = line.removeprefix(f"{source}: ... and ").removesuffix(" more errors")
    return int(count) if count.isdecimal() and count.isascii() else 0


def _error_source(line: str) -> str:
    head = line.split(": ", 1)[0]
    name, _, number = head.rpartition(":")
    return name if name and number.isdigit() else head


def key_file_errors(config: Config) -> list[str]:
    """Every TSIG key file the transferred lists and [publish] name, read as blockd run would."""
    from blockd.tsig_key import KeyFileError, load_key_file

    errors = []
    paths = [lst.tsig for lst in config.lists.values() if lst.tsig is not None]
    if config.publish.tsig is not None:
        paths.append(config.publish.tsig)
    for path in paths:
        try:
            load_key_file(path)
        except KeyFileError as exc:
            errors += [str(e) for e in exc.errors]
    return errors


def run_command(path: Path | None) -> int:
    from blockd.daemon import run  # Twisted and the reactor only for `run`

    return run(path)


def reload_command(pidfile: Path | None, config_path: Path | None, timeout: float) -> int:
    from blockd.reload import status_path_for

    if pidfile is None:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            print("\n".join(exc.errors), file=sys.stderr)
            return 1
        pidfile = config.server.pidfile
        if pidfile is None:
            print(f"blockd reload: {config.source} sets no server.pidfile; pass --pidfile", file=sys.stderr)
            return 1
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        print(f"blockd reload: cannot read pid from {pidfile}: {exc}", file=sys.stderr)
        return 1
    status_path = status_path_for(pidfile)
    before = _read_status(status_path).signals
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"blockd reload: cannot signal pid {pid} (from {pidfile}): {exc.strerror}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _read_status(status_path)
        if status.pid == pid and status.covered >= before + 1:
            if status.result == "success":
                print(f"blockd reload: pid {pid} reloaded")
                return 0
            for line in status.errors:
                print(line, file=sys.stderr)
            print(f"blockd reload: pid {pid} refused the reload and keeps serving the previous policy", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"blockd reload: no outcome from pid {pid} within {timeout:g}s", file=sys.stderr)
    return 1


@dataclass(frozen=True)
class ReloadStatus:
    """The daemon's reload status file (blockd.reload.ReloadState.as_json); a missing or mistyped
    value reads as its default."""

    pid: int | None = None
    signals: int = 0
    covered: int = 0
    result: str | None = None
    errors: tuple[str, ...] = ()


def _read_status(path: Path) -> ReloadStatus:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ReloadStatus()
    if not isinstance(data, dict):
        return ReloadStatus()
    pid, signals, covered = (data.get(key) for key in ("pid", "signals", "covered"))
    result, errors = data.get("result"), data.get("errors")
    return ReloadStatus(
        pid=pid if isinstance(pid, int) else None,
        signals=signals if isinstance(signals, int) else 0,
        covered=covered if isinstance(covered, int) else 0,
        result=result if isinstance(result, str) else None,
        errors=tuple(line for line in errors if isinstance(line, str)) if isinstance(errors, list) else (),
    )


if __name__ == "__main__":
    sys.exit(main())
