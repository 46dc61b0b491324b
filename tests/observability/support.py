"""Helpers for the observability tests: the Prometheus tools, a real Prometheus server of our own, the
dashboard's queries with Grafana's template variables substituted, and /metrics parsing.

Prometheus and promtool come from Debian's ``prometheus`` package (scripts/setup.sh installs it for the
tests). Without them a test skips, unless ``CI`` is set: there a missing tool is a failure.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT, Service, free_port, http_ok, wait_until

GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "beeline-dashboard.json"
RULES = GRAFANA / "prometheus-rules.yml"
RULES_TEST = GRAFANA / "prometheus-rules.test.yml"
PROMETHEUS_EXAMPLE = GRAFANA / "prometheus.example.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

GATEWAY_JOB = "beeline-gateway"
ROUTER_JOB = "beeline-router"
"""Scrape job names the alert rules assume (docs/operations.md shows the scrape config)."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str) -> str:
    """The path of ``name`` (``prometheus`` or ``promtool``); skips without it, but fails under CI."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian package 'prometheus'; BEELINE_SETUP_TESTS=1 scripts/setup.sh)"
    if in_ci():
        pytest.fail(f"{message}, and CI is set: the observability checks must run in CI")
    pytest.skip(message)


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries (rows excluded), including panels nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's substitution of template and global variables, as it sends the query to Prometheus."""
    for name in sorted(variables, key=len, reverse=True):  # $__rate_interval before $__range etc.
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def grafana_variables(node_regex: str, rate_interval: str) -> dict[str, str]:
    """Values Grafana would use: a multi-value ``$node`` becomes a regex alternation ``(a|b)``."""
    return {
        "node": node_regex,
        "__rate_interval": rate_interval,
        "__interval": "2s",
        "__interval_ms": "2000",
        "__range": rate_interval,
        "__range_s": "60",
    }


def scrape(text: str) -> list[Any]:
    """Every sample of a /metrics body."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


async def metrics_text(session: aiohttp.ClientSession, svc: Service) -> str:
    async with session.get(f"{svc.base_url}/metrics") as r:
        assert r.status == 200
        return await r.text()


@dataclass
class PrometheusServer:
    """A real Prometheus on a free loopback port with its own TSDB directory, scraping the given
    services every second and evaluating ``rule_files``; ``stop()`` ends it and removes the directory."""

    binary: str
    jobs: dict[str, list[Service]]
    rule_files: list[Path] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="beeline-prometheus-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        # JSON is YAML: no YAML library needed to write Prometheus's config.
        return {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [{"targets": [f"127.0.0.1:{svc.port}" for svc in services]}],
                }
                for job, services in self.jobs.items()
            ],
        }

    def start(self) -> PrometheusServer:
        config = self.dir / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        log = (self.dir / "prometheus.log").open("wb")
        with log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self.ready, timeout=30, interval=0.1, what=f"prometheus ready on {self.port}")
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
        return http_ok(f"{self.url}/-/ready")

    def logs(self) -> str:
        path = self.dir / "prometheus.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    async def api(self, session: aiohttp.ClientSession, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; returns ``data`` and fails the test on an API error."""
        async with session.get(f"{self.url}/api/v1/{path}", params=params) as r:
            body = await r.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, session: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        """An instant query at now; the vector it returns (a scalar is returned as one unlabelled sample)."""
        data = await self.api(session, "query", query=expr, time=f"{time.time():.3f}")
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    async def targets_up(self, session: aiohttp.ClientSession) -> bool:
        data = await self.api(session, "targets", state="active")
        targets = data["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)


def has_number(result: list[dict[str, Any]]) -> bool:
    """At least one sample that is a number (histogram_quantile over no observations gives NaN)."""
    for sample in result:
        with contextlib.suppress(ValueError):
            if not math.isnan(float(sample["value"][1])):
                return True
    return False
