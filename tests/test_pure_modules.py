"""The pure core imports no I/O: no Twisted, pyroute2, socket or time (STYLE.md: pure core, thin edges).

Checked two ways: statically (every import statement of each pure module names only the standard
library minus socket/time, dnslib, or another pure module), and at run time (importing all of
them in a fresh interpreter loads neither Twisted nor pyroute2).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "blockd"

PURE = (
    "names",
    "url_source",
    "lists",
    "matcher",
    "prefix_table",
    "classify",
    "policy",
    "upstream_answer",
    "cache",
    "egress",
    "config",
    "wire",
    "slowpath",
    "question",
    "repeats",
    "framing",
    "settings",
    "rpz",
    "sources",
    "notify",
    "tsig_key",
    "xfr",
    "refresh",
    "garden",
    "fstrm",
    "dnstap_frames",
    "validator_export",
    "explain",
    "scrub",
    "excerpt",
    "bounded_read",
    "limits",
    "query_errors",
    "log_sampling",
    "upstream_health",
    "publish_zone",
    "publish_journal",
    "publish_wire",
)
# Compiled helpers of pure modules (C, no I/O; blockd/<name>.c with a .pyi of its types).
COMPILED = ("_dnstap_fast",)
FORBIDDEN = ("twisted", "pyroute2", "socket", "time", "zope", "prometheus_client")
ALLOWED_THIRD_PARTY = ("dnslib", "dns", "dnstap_pb")  # dns: dnspython; dnstap_pb: dnstap.proto compiled


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "blockd":
                names.update(f"blockd.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_only_pure_things(module: str) -> None:
    for name in imported_modules(PACKAGE / f"{module}.py"):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"blockd.{module} imports {name}"
        if top == "blockd" and name != "blockd":
            assert name.removeprefix("blockd.") in PURE + COMPILED, f"blockd.{module} imports the I/O module {name}"
        elif top not in ("blockd", "__future__", *ALLOWED_THIRD_PARTY):
            assert top in sys.stdlib_module_names, f"blockd.{module} imports the third-party {name}"


def test_importing_the_pure_core_loads_no_io_library() -> None:
    code = (
        "import sys\n"
        + "".join(f"import blockd.{module}\n" for module in PURE)
        + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'pyroute2', 'prometheus_client')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_module_is_classified() -> None:
    """A new module must be added to PURE here, or be an I/O module on purpose (listed below)."""
    io_modules = {
        "__init__", "__main__", "admin", "cli", "daemon", "egress_service", "interface_groups", "metrics",
        "netlink", "netlink_services", "querylog", "reload", "resolver", "server", "services", "upstream",
        "transfer", "zone_store", "secondary_lists", "dnstap", "writer_thread", "kernel_filter", "kernel_blocks",
        "sd_notify", "privileges", "kit", "url_lists", "http_proxy", "publish", "publish_notify",
    }  # fmt: skip
    found = {path.stem for path in PACKAGE.glob("*.py")}
    assert found == set(PURE) | io_modules
