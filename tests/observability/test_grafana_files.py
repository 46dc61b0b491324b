"""The files under ``grafana/`` on their own: the dashboard's structure (importable into current Grafana,
a Prometheus data-source variable and a node variable, every panel queries metrics the services really
export) and the Prometheus rules (``promtool check rules``, ``promtool test rules`` with a test per
alert, a summary and a runbook line on every alert). ``test_prometheus.py`` evaluates them for real."""

from __future__ import annotations

import re
import subprocess

from prometheus_client import CollectorRegistry

from shared.metrics import Metrics
from tests.observability.support import (
    OPERATIONS,
    PROMETHEUS_EXAMPLE,
    RULES,
    RULES_TEST,
    load_dashboard,
    query_panels,
    require_tool,
)

MIN_SCHEMA_VERSION = 36
"""Grafana 9.x and later (current Grafana migrates any older schema on import, newer is refused by old)."""

METRIC_NAME = re.compile(r"\b(beeline_[a-z0-9_]+)\b")


def exported_names() -> set[str]:
    """Every sample name the router and a gateway export, with the _bucket/_count/_sum/_total forms."""
    names: set[str] = set()
    for metrics in (Metrics(CollectorRegistry(), service="router"), Metrics(CollectorRegistry(), service="gateway")):
        for family in metrics.registry.collect():
            names.update(sample.name for sample in family.samples)
            if family.type == "histogram":
                names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum"))
            if family.type == "counter":
                names.add(f"{family.name}_total")
    return names


def test_dashboard_is_importable_with_datasource_and_node_variables() -> None:
    """The dashboard JSON has what Grafana's import needs (title, uid, a current schemaVersion, panels
    with unique ids on the 24-column grid), a ``datasource`` variable of type prometheus, and a
    multi-value ``node`` variable queried from that data source with an All option."""
    dashboard = load_dashboard()
    assert dashboard["title"] and dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= MIN_SCHEMA_VERSION
    assert "id" not in dashboard or dashboard["id"] is None, "an exported id would clash on import"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    node = variables["node"]
    assert node["type"] == "query" and node["multi"] is True and node["includeAll"] is True
    assert node["datasource"]["uid"] == "${datasource}"
    node_query = node["query"]["query"] if isinstance(node["query"], dict) else node["query"]
    assert node_query.startswith("label_values(") and node_query.endswith(", node)"), node_query
    nested = [p for row in dashboard["panels"] if row.get("type") == "row" for p in row.get("panels", [])]
    ids = [p["id"] for p in dashboard["panels"] + nested]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]


def test_every_panel_queries_exported_metrics_through_the_datasource_variable() -> None:
    """Every query panel reads from ``${datasource}``, has targets with a PromQL ``expr`` and a unique
    refId, and every ``beeline_*`` name in an expr is a sample the services export (a metric rename
    that forgets the dashboard fails here). Per-node metrics are filtered by ``$node``."""
    exported = exported_names()
    panels = query_panels(load_dashboard())
    assert len(panels) >= 10
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", title
        targets = panel["targets"]
        assert targets, title
        assert len({t["refId"] for t in targets}) == len(targets), title
        for target in targets:
            expr = target["expr"]
            assert expr.strip(), title
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}", title
            for name in METRIC_NAME.findall(expr):
                assert name in exported, f"{title}: {name} is not exported by shared/metrics.py"
            if "beeline_gateway_" in expr:
                assert 'node=~"$node"' in expr, f"{title}: per-node metric not filtered by $node: {expr}"


def test_dashboard_covers_the_operational_questions() -> None:
    """The panels the issue asks for exist: latency p50/p95/p99 by path, messages by outcome,
    connections per node and by protocol, presence size, stream lag per node, mailbox activity, Redis latency and
    errors, rejections by code."""
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in query_panels(load_dashboard())}
    every = " ".join(exprs.values())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, path) (rate(beeline_delivery_latency_seconds" in every
    for needle in (
        "sum by (outcome) (rate(beeline_messages_total",
        "sum by (node) (beeline_gateway_connections",
        "sum by (protocol) (beeline_gateway_connections",
        "beeline_gateway_presence_users",
        "beeline_gateway_stream_lag_entries",
        "beeline_mailbox_appends_total",
        "beeline_mailbox_trims_total",
        "beeline_redis_command_duration_seconds_bucket",
        "beeline_redis_errors_total",
        "sum by (service, code) (rate(beeline_rejections_total",
        "beeline_gateway_slow_client_closes_total",
    ):
        assert needle in every, needle


def _alert_blocks() -> dict[str, str]:
    """Alert name -> the text of its rule in the rules file."""
    text = RULES.read_text(encoding="utf-8")
    parts = re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def test_promtool_check_rules_passes() -> None:
    """``promtool check rules`` accepts the rules file (syntax, PromQL, templates)."""
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_accepts_the_example_prometheus_config() -> None:
    """``promtool check config`` accepts ``grafana/prometheus.example.yml`` and the rules file it loads."""
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_EXAMPLE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, result.stdout


def test_every_alert_has_summary_runbook_and_a_promtool_test() -> None:
    """The alerts the issue asks for exist, each with severity, summary, description and a runbook line
    (plus a runbook_url into docs/operations.md), and each is the subject of a promtool unit test that
    expects it to fire."""
    alerts = _alert_blocks()
    for required in (
        "BeelineDeliveryLatencyHigh",
        "BeelineStreamLagGrowing",
        "BeelineGatewayDown",
        "BeelineRedisErrors",
        "BeelineMailboxNearCap",
        "BeelineSlowClientClosesRising",
    ):
        assert required in alerts, required
    tests = RULES_TEST.read_text(encoding="utf-8")
    for name, block in alerts.items():
        for key in ("severity:", "summary:", "description:", "runbook:", "runbook_url: docs/operations.md#"):
            assert key in block, f"{name} has no {key}"
        firing = re.search(rf"alertname: {name}\n\s*exp_alerts:\n\s*- exp_labels:", tests)
        assert firing, f"no promtool test expects {name} to fire"


def test_promtool_unit_tests_of_every_alert_pass() -> None:
    """``promtool test rules`` runs the unit tests: every alert fires on its condition with its labels
    and rendered annotations, stays quiet while pending, and does not fire for the neighbouring series."""
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def test_operations_guide_names_real_panels_and_every_runbook_anchor_exists() -> None:
    """docs/operations.md answers the three questions of the issue ("a message did not arrive", "latency
    went up", "a node is overloaded"); every panel it names in bold, and every panel an alert's runbook
    line quotes, is a dashboard panel title; every alert's runbook_url anchor is a heading there."""
    guide = OPERATIONS.read_text(encoding="utf-8")
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", guide, flags=re.MULTILINE)}
    for question in ("a-message-did-not-arrive", "latency-went-up", "a-node-is-overloaded"):
        assert question in anchors, question
    titles = {p["title"] for p in query_panels(load_dashboard())}
    section = guide.split("## Which panel answers which question", 1)[1].split("\n## ", 1)[0]
    named = {" ".join(m.split()) for m in re.findall(r"\*\*([^*]+)\*\*", section)}
    assert named, "the guide names no panel"
    assert named <= titles, f"not dashboard panels: {sorted(named - titles)}"
    for name, block in _alert_blocks().items():
        anchor = re.search(r"runbook_url: docs/operations\.md#([a-z0-9-]+)", block)
        assert anchor and anchor.group(1) in anchors, f"{name}: runbook_url anchor missing in the guide"
        runbook = block.split("runbook:", 1)[1].split("runbook_url:", 1)[0]
        quoted = set(re.findall(r'"([^"]+)"', runbook))
        assert quoted <= titles, f"{name}: runbook names no such panel: {sorted(quoted - titles)}"
