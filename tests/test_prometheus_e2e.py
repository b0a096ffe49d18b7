"""End to end as the SOC sees it: a real Prometheus scrapes blockd, PromQL reads the blocks back."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.daemon import GOV, free_port

PROMETHEUS = shutil.which("prometheus")


def promql(port: int, expression: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success"
    return body["data"]["result"]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus)")
def test_blocked_lookups_visible_in_prometheus(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: blockd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{daemon.metrics_port}']\n"
    )
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "wb"),
    )
    try:
        for index in range(25):
            daemon.query(f"v{index}.tiktok.com", source=GOV)
        expression = 'sum(blockd_dns_blocked_total{job="blockd",group="government",list="tiktok"})'
        deadline = time.monotonic() + 30
        value = None
        while time.monotonic() < deadline:
            try:
                result = promql(port, expression)
            except OSError:
                result = []
            if result:
                value = float(result[0]["value"][1])
                if value == 25:
                    break
            time.sleep(0.5)
        assert value == 25, (tmp_path / "prometheus.log").read_text()[-2000:]
        up = promql(port, 'up{job="blockd"}')
        assert up and up[0]["value"][1] == "1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
