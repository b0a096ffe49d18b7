"""`blockd kit DIR`: write the deploy kit that ships in the package onto a host.

The kit is deploy/ (systemd unit, example config, Prometheus scrape config, alert rules and their
tests, Grafana dashboard, iproute2 names) plus the shipped lists (domains/, which the example
config's relative paths name), read from the installed package data (blockd/_data) or, in a source
checkout, from the repository.  The unit's ExecStartPre/ExecStart/ExecReload are rewritten to the
`blockd` of the installation running the command, so a venv under /opt, pipx and a system-wide
pip all get a unit systemd accepts with no hand editing.

Existing files are never overwritten without --force; nothing is written when any would be.
No config keys, no metrics.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from blockd.config import packaged_data_dir

KIT_FILES = (
    "blockd.service",
    "blockd.example.toml",
    "prometheus/prometheus.yml",
    "prometheus/blockd-alerts.yml",
    "prometheus/blockd-alerts.test.yml",
    "grafana/blockd-dashboard.json",
    "iproute2/blockd-rt_tables.conf",
    "iproute2/blockd-rt_protos.conf",
)
UNIT = "blockd.service"
EXEC_KEYS = ("ExecStartPre", "ExecStart", "ExecReload")
# systemd would expand %specifiers and $VARIABLES, or split on blanks: such paths are refused
# rather than escaped, as no installation layout needs them.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9/._+@-]*")


class KitError(Exception):
    """Why the kit was not written (one message per line)."""


@dataclass(frozen=True)
class KitSource:
    deploy: Path
    domains: Path


def kit_source() -> KitSource:
    """The installed package data, else the source checkout (deploy/ and domains/ at its top)."""
    packaged = packaged_data_dir()
    bases = [packaged] if packaged is not None else []
    bases.append(Path(__file__).resolve().parent.parent)
    for base in bases:
        if (base / "deploy" / UNIT).is_file() and (base / "domains").is_dir():
            return KitSource(base / "deploy", base / "domains")
    raise KitError(f"no deploy kit in {' or '.join(str(b) for b in bases)}: a broken installation?")


def installed_blockd(argv0: str | None = None, executable: str | None = None) -> Path:
    """The `blockd` console script of this installation: the one running (argv[0], resolved: pipx's
    bin link leads to its venv), else the one beside the interpreter (a venv's bin/, for
    `python -m blockd`), else the scripts directory of the install scheme (system-wide pip)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    candidates = []
    if Path(argv0).name == "blockd":
        candidates.append(Path(argv0).resolve())
    if executable:  # not resolved: a venv's python is a link out of the venv
        candidates.append(Path(os.path.abspath(executable)).parent / "blockd")
    candidates.append(Path(sysconfig.get_path("scripts")) / "blockd")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise KitError(f"cannot find the blockd console script (tried {', '.join(map(str, candidates))}); pass --blockd")


def render_unit(text: str, blockd: Path) -> str:
    """The unit with every ExecStartPre/ExecStart/ExecReload running `blockd`, and a note saying so."""
    if not _PLAIN_PATH.fullmatch(str(blockd)):
        raise KitError(f"{blockd}: not an absolute path without blanks, % or $ (which systemd would read specially)")
    lines = []
    for line in text.splitlines(keepends=True):
        key, sep, command = line.partition("=")
        if sep and key in EXEC_KEYS:
            _old, _, args = command.partition(" ")
            line = f"{key}={blockd} {args}"
        lines.append(line)
    note = f"# Written by `blockd kit`: the Exec lines run {blockd}.\n"
    return note + "".join(lines)


def plan(source: KitSource, blockd: Path) -> dict[str, bytes]:
    """Every file of the kit, by its path relative to DIR."""
    files: dict[str, bytes] = {}
    for name in KIT_FILES:
        data = (source.deploy / name).read_bytes()
        if name == UNIT:
            data = render_unit(data.decode("utf-8"), blockd).encode("utf-8")
        files[name] = data
    for path in sorted(source.domains.iterdir()):
        if path.is_file() and path.suffix in (".txt", ".md"):
            files[f"domains/{path.name}"] = path.read_bytes()
    return files


def write_kit(target: Path, files: dict[str, bytes], force: bool) -> list[Path]:
    """Write the files below target; refuse (writing nothing) if any exists and not force."""
    paths = {name: target / name for name in files}
    existing = [path for path in paths.values() if path.exists() or path.is_symlink()]
    if existing and not force:
        raise KitError("\n".join(f"{path}: exists; pass --force to overwrite" for path in existing))
    written = []
    for name, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])
        written.append(path)
    return written


def kit_command(target: Path, force: bool, blockd: Path | None) -> int:
    try:
        program = installed_blockd() if blockd is None else blockd.absolute()
        written = write_kit(target, plan(kit_source(), program), force)
    except KitError as exc:
        for line in str(exc).splitlines():
            print(f"blockd kit: {line}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"blockd kit: {exc.filename or target}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    print(f"the unit {target / UNIT} runs {program}")
    if program.is_relative_to("/home") or program.is_relative_to("/root"):
        print(f"warning: the unit's ProtectHome=yes hides {program}; install blockd outside home directories "
              "(a venv under /opt, or pipx with PIPX_HOME=/opt/pipx)", file=sys.stderr)  # fmt: skip
    return 0
