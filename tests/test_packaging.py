"""The built packages: the sdist and the wheel carry the shipped lists and the deploy kit, and an
installed wheel works outside the checkout (issue 13).

The sdist is built from a copy of the working tree (so the shared tree gets no build/ directory)
with the installed setuptools' PEP 517 backend; the wheel is built from that sdist by pip, as
`python -m build` and a `pip install` from PyPI do.  pip's isolated build fetches setuptools from
PyPI unless the `wheel` package is installed here (then the build runs offline).  The wheel is then
installed twice with no dependency downloads: into a fresh venv that sees this interpreter's
packages, and with `pip install --prefix` into a fresh prefix (the system-wide layout, bin/ and
lib/pythonX.Y/site-packages).  Each runs `blockd check` on the embedded default from `/` and
`blockd kit`, whose unit `systemd-analyze verify` accepts when systemd-analyze is on PATH.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockd.kit import KIT_FILES, KitError, render_unit

REPO = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 240  # a build takes a few seconds; an isolated one also downloads setuptools
RUN_TIMEOUT = 60
# --ignore-installed: without it, pip uninstalls the blockd of the running interpreter (the
# developer's editable install) before putting the wheel into a --prefix or a venv that sees it.
PIP_INSTALL = ["-q", "--no-deps", "--no-index", "--ignore-installed"]

SHIPPED_LISTS = sorted(p.name for p in (REPO / "domains").iterdir() if p.suffix in (".txt", ".md"))
DEPLOY_FILES = sorted(str(p.relative_to(REPO / "deploy")) for p in (REPO / "deploy").rglob("*") if p.is_file())


def run(
    cmd: list[str | Path], cwd: Path | str = "/", env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("BLOCKD_DATA_DIR", "PYTHONPATH")}
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@dataclass(frozen=True)
class Packages:
    sdist: Path
    wheel: Path


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    work = tmp_path_factory.mktemp("build")
    source = work / "source"
    shutil.copytree(
        REPO, source,
        ignore=shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", "*.so", "build", "dist", ".*_cache",
                                      ".hypothesis", "bench", "tests"),
    )  # fmt: skip
    dist = work / "dist"
    build_sdist = f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"
    ok(run([sys.executable, "-c", build_sdist], cwd=source, timeout=BUILD_TIMEOUT))
    (sdist,) = dist.glob("blockd-*.tar.gz")
    offline = ["--no-build-isolation"] if importlib.util.find_spec("wheel") else []
    pip_wheel: list[str | Path] = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *offline, "-w", dist, sdist]
    ok(run(pip_wheel, timeout=BUILD_TIMEOUT))
    (wheel,) = dist.glob("blockd-*.whl")
    return Packages(sdist, wheel)


@dataclass(frozen=True)
class Installation:
    blockd: Path  # the console script
    python: Path
    env: dict[str, str]
    site: Path  # where the package went


@pytest.fixture(scope="module")
def venv(packages: Packages, tmp_path_factory: pytest.TempPathFactory) -> Installation:
    """The wheel in a fresh venv under a directory like /opt/blockd; dependencies from this interpreter."""
    root = tmp_path_factory.mktemp("opt") / "blockd"
    ok(run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root], timeout=BUILD_TIMEOUT))
    python = root / "bin" / "python"
    # This interpreter's pip installs into the venv (pip 22.3+: --python), so the venv needs none.
    pip_install: list[str | Path] = [sys.executable, "-m", "pip", "--python", python, "install", *PIP_INSTALL]
    ok(run([*pip_install, packages.wheel], timeout=BUILD_TIMEOUT))
    site = Path(ok(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])).strip())
    return Installation(root / "bin" / "blockd", python, {}, site)


@pytest.fixture(scope="module")
def prefix(packages: Packages, tmp_path_factory: pytest.TempPathFactory) -> Installation:
    """The wheel as a system-wide pip puts it (`--prefix`, the layout of /usr/local)."""
    root = tmp_path_factory.mktemp("usr-local")
    before = _installed_here()
    ok(run([sys.executable, "-m", "pip", "install", *PIP_INSTALL, "--prefix", root, packages.wheel]))
    assert _installed_here() == before, "pip install --prefix changed this interpreter's blockd"
    site = Path(sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)}))
    # A real /usr/local is on the interpreter's path already; this fresh prefix needs PYTHONPATH.
    return Installation(root / "bin" / "blockd", Path(sys.executable), {"PYTHONPATH": str(site)}, site)


def _installed_here() -> str:
    """Where this interpreter's own blockd distribution is installed, if anywhere."""
    code = "import importlib.metadata as m\ntry: print(m.distribution('blockd')._path)\nexcept Exception: print('-')"
    return ok(run([sys.executable, "-c", code]))


def test_sdist_holds_the_lists_and_the_deploy_kit(packages: Packages) -> None:
    with tarfile.open(packages.sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        for name in SHIPPED_LISTS:
            member = tar.extractfile(f"{top}/domains/{name}")
            assert member is not None and member.read() == (REPO / "domains" / name).read_bytes(), name
        for name in DEPLOY_FILES:
            member = tar.extractfile(f"{top}/deploy/{name}")
            assert member is not None and member.read() == (REPO / "deploy" / name).read_bytes(), name


def test_wheel_holds_the_lists_and_the_deploy_kit(packages: Packages) -> None:
    with zipfile.ZipFile(packages.wheel) as wheel:
        for name in SHIPPED_LISTS:
            assert wheel.read(f"blockd/_data/domains/{name}") == (REPO / "domains" / name).read_bytes(), name
        for name in DEPLOY_FILES:
            assert wheel.read(f"blockd/_data/deploy/{name}") == (REPO / "deploy" / name).read_bytes(), name
        # The kit writes every deploy file: a new one must be added to blockd.kit.KIT_FILES.
        assert sorted(KIT_FILES) == DEPLOY_FILES


@pytest.mark.parametrize("layout", ["venv", "prefix"])
def test_installed_check_runs_the_embedded_default_with_the_shipped_lists(
    layout: str, request: pytest.FixtureRequest
) -> None:
    install: Installation = request.getfixturevalue(layout)
    where = ok(run([install.python, "-c", "import blockd; print(blockd.__file__)"], env=install.env))
    assert Path(where.strip()).is_relative_to(install.site), "the installed copy, not the checkout"
    out = ok(run([install.blockd, "check"], env=install.env))
    assert out.startswith("<embedded default>: OK:")
    for name in ("tiktok", "bytedance", "doh-bypass"):
        assert f"list {name}: " in out and f"from {install.site}/blockd/_data/domains/{name}.txt" in out, out


def test_blockd_data_dir_replaces_the_shipped_lists(venv: Installation, tmp_path: Path) -> None:
    (tmp_path / "domains").mkdir()
    for name in ("bytedance.txt", "doh-bypass.txt"):
        shutil.copy(REPO / "domains" / name, tmp_path / "domains" / name)
    (tmp_path / "domains" / "tiktok.txt").write_text("tiktok.com\n")
    out = ok(run([venv.blockd, "check"], env={"BLOCKD_DATA_DIR": str(tmp_path)}))
    assert f"list tiktok: 1 domains from {tmp_path}/domains/tiktok.txt" in out
    # A directory without the lists is an error that names it, not a silent fall-back.
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run([venv.blockd, "check"], env={"BLOCKD_DATA_DIR": str(empty)})
    assert proc.returncode == 1 and f"{empty}/domains/tiktok.txt" in proc.stderr


def verify_unit(unit: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        return  # tests/test_deploy.py reports the skip; the unit's text is checked by the callers
    proc = run(["systemd-analyze", "verify", unit], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def exec_lines(unit: Path) -> dict[str, str]:
    lines = (line.partition("=") for line in unit.read_text().splitlines())
    return {key: value for key, sep, value in lines if sep and key in ("ExecStartPre", "ExecStart", "ExecReload")}


@pytest.mark.parametrize("layout", ["venv", "prefix"])
def test_installed_kit_writes_a_unit_for_that_installation(
    layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    install: Installation = request.getfixturevalue(layout)
    kit = tmp_path / "kit"
    out = ok(run([install.blockd, "kit", kit], env=install.env))
    assert f"wrote {kit / 'blockd.service'}" in out
    assert exec_lines(kit / "blockd.service") == {
        "ExecStartPre": f"{install.blockd} check --config /etc/blockd/blockd.toml",
        "ExecStart": f"{install.blockd} run --config /etc/blockd/blockd.toml",
        "ExecReload": f"{install.blockd} reload --config /etc/blockd/blockd.toml",
    }
    for name in DEPLOY_FILES:
        if name != "blockd.service":
            assert (kit / name).read_bytes() == (REPO / "deploy" / name).read_bytes(), name
    for name in SHIPPED_LISTS:
        assert (kit / "domains" / name).read_bytes() == (REPO / "domains" / name).read_bytes(), name
    verify_unit(kit / "blockd.service")
    # The example config and the lists beside it, as README's install section puts them in /etc/blockd.
    ok(run([install.blockd, "check", "--config", kit / "blockd.example.toml"], env=install.env))


def test_readme_install_section_names_what_the_kit_writes(venv: Installation, tmp_path: Path) -> None:
    """Every kit file README's install section copies from /root/blockd-kit exists in a written kit."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Install on a resolver host") : readme.index("## Deployment")]
    named = set(re.findall(r"/root/blockd-kit/([\w./*-]+)", section))
    assert {"blockd.service", "blockd.example.toml", "domains/*"} <= named
    ok(run([venv.blockd, "kit", tmp_path]))
    for name in named:
        assert list(tmp_path.glob(name.rstrip("/"))), f"README names /root/blockd-kit/{name}; the kit has no such file"
    assert "/opt/blockd/bin/blockd kit /root/blockd-kit" in section and "systemd-analyze verify" in section


def test_kit_refuses_to_overwrite_unless_forced(venv: Installation, tmp_path: Path) -> None:
    unit = tmp_path / "blockd.service"
    unit.write_text("mine\n")
    proc = run([venv.blockd, "kit", tmp_path])
    assert proc.returncode == 1 and f"{unit}: exists; pass --force" in proc.stderr
    assert unit.read_text() == "mine\n" and not (tmp_path / "blockd.example.toml").exists(), "nothing written"
    ok(run([venv.blockd, "kit", "--force", tmp_path]))
    assert exec_lines(unit)["ExecStart"].startswith(f"{venv.blockd} run ")


def test_kit_from_python_m_names_the_console_script_beside_the_interpreter(venv: Installation, tmp_path: Path) -> None:
    ok(run([venv.python, "-m", "blockd", "kit", tmp_path]))
    assert exec_lines(tmp_path / "blockd.service")["ExecReload"].startswith(f"{venv.blockd} reload ")
    verify_unit(tmp_path / "blockd.service")


@pytest.mark.parametrize("path", ["/opt/my blockd/bin/blockd", "/opt/b%i/bin/blockd", "/opt/$X/blockd", "bin/blockd"])
def test_kit_refuses_a_path_systemd_would_read_differently(path: str) -> None:
    with pytest.raises(KitError, match="not an absolute path"):
        render_unit((REPO / "deploy" / "blockd.service").read_text(), Path(path))


# --- README's install section, run -------------------------------------------------------------

# The absolute paths the section names, where they start a word (not inside a relocated path).
_RELOCATED = re.compile(r"(?<![\w/.-])(?:/opt/blockd|/root/blockd-kit|/etc/blockd|/etc/systemd/system)")


def _readme_install_section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme[readme.index("## Install on a resolver host") : readme.index("## Deployment")]


def _block(section: str, marker: str) -> list[str]:
    """The lines of the section's ```sh block that contains marker."""
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", section, re.S) if marker in b]
    return [line.strip() for line in block.splitlines() if line.strip()]


def _inline(section: str, start: str) -> str:
    (command,) = set(re.findall(rf"`({re.escape(start)}[^`]*)`", section))
    return command


def test_readme_install_steps_run_in_a_fresh_root(packages: Packages, tmp_path: Path) -> None:
    """Steps 2 to 5 of README's install section, as written, with /opt, /etc and /root under a
    temp dir: the venv (from the wheel, as the README offers), the kit, the config with the lists
    beside it, `blockd check`, the unit and `systemd-analyze verify`.  What needs systemd as PID 1
    (systemctl) is replaced by running the installed unit's ExecStart, then the README's dig.
    Step 1 (useradd) is not run: it would change this machine's accounts; pipx is not installed."""
    section = _readme_install_section()
    root = tmp_path / "root"

    def shell(line: str, cwd: Path = tmp_path) -> str:
        if "# or a wheel: " in line:  # the offline alternative the README gives
            line = line.split("# or a wheel: ", 1)[1]
        line = _RELOCATED.sub(lambda m: f"{root}{m.group(0)}", line.split(" #", 1)[0])
        return ok(run(["sh", "-ec", line], cwd=cwd, timeout=BUILD_TIMEOUT))

    for directory in ("opt", "etc/systemd/system", "root"):
        (root / directory).mkdir(parents=True)
    for line in _block(section, "python3 -m venv"):  # step 2, in the wheel's directory
        shell(line, cwd=packages.wheel.parent)
    shell(_inline(section, "/opt/blockd/bin/blockd kit "))  # step 3
    for line in _block(section, "install -d"):  # step 4
        shell(line)
    config = root / "etc/blockd/blockd.toml"
    port, upstream = _edit_config(config, tmp_path)
    shell(_inline(section, "/opt/blockd/bin/blockd check "))
    dig = None
    for line in _block(section, "systemd-analyze verify"):  # step 5
        if line.startswith("systemctl"):
            continue  # no systemd as PID 1 here: the unit's ExecStart runs below instead
        if line.startswith("dig "):
            dig = line
            continue
        shell(line)
    unit = root / "etc/systemd/system/blockd.service"
    command = exec_lines(unit)["ExecStart"]
    assert command.startswith(f"{root}/opt/blockd/bin/blockd run ")
    assert dig is not None and "0.0.0.0" in section
    daemon = subprocess.Popen(
        _RELOCATED.sub(lambda m: f"{root}{m.group(0)}", command).split(), stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "blockd.log").open("wb"), cwd="/",
    )  # fmt: skip
    try:
        answer = ""
        for _ in range(100):
            asked = run(["sh", "-c", dig.split(" #", 1)[0] + f" -p {port} +time=1 +tries=1"])
            answer = asked.stdout.strip()
            if asked.returncode == 0 and answer:
                break
            time.sleep(0.1)
        assert answer == "0.0.0.0", (tmp_path / "blockd.log").read_text()
    finally:
        daemon.terminate()
        daemon.wait(10)
        upstream.close()


def _edit_config(config: Path, tmp_path: Path) -> tuple[int, Any]:
    """The edit README's step 4 asks for: listen, upstream and a group for this host, on loopback;
    the pidfile, query log and state in temp dirs (systemd would create /run/blockd and friends)."""
    from tests.daemon import free_port
    from tests.fakeupstream import FakeUpstream

    port, upstream = free_port(), FakeUpstream()
    text = config.read_text()
    edits = [
        (r'^listen = \["0\.0\.0\.0:53", "\[::\]:53"\]$', f'listen = ["127.0.0.1:{port}"]'),
        (r"^pidfile = .*$", f'pidfile = "{tmp_path}/blockd.pid"'),
        (r"^state_dir = .*$", f'state_dir = "{tmp_path}/state"'),
        (r"^servers = .*$", f'servers = ["{upstream.address}"]'),
        (r'^path = "/var/log/blockd/queries\.jsonl"$', f'path = "{tmp_path}/queries.jsonl"'),
        (r'^listen = "127\.0\.0\.1:9553"$', 'listen = ""'),
        (r'^networks = \["10\.120\.0\.0/22"', 'networks = ["127.0.0.0/8", "10.120.0.0/22"'),
    ]
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text, count=1, flags=re.M)
        assert count == 1, f"the example config has no line matching {pattern}"
    config.write_text(text)
    return port, upstream
