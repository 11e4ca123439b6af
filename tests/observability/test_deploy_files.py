"""The deploy/ files agree with each other and with the docs (no Prometheus needed).

* every alert has summary, description and a runbook_url whose anchor exists
  in docs/runbooks.md, and a promtool unit test in which it fires;
* every recording rule has a promtool expression test;
* every metric a rule, a dashboard or the broker exports is in docs/metrics.md;
* every dashboard is Grafana dashboard JSON: schema version, uid, panels with
  a datasource and targets.
"""

from __future__ import annotations

import re

import pytest
import yaml
from prom_helpers import (
    CONFIG,
    GRAFANA_DIR,
    ROOT,
    RULES_TEST,
    alert_rules,
    dashboards,
    metric_names,
    panel_queries,
    recording_rules,
)
from prometheus_client import CollectorRegistry

from broker.core import BrokerCore
from broker.events import JobSubmitted, SchedulePass, WorkerRegistered
from broker.metrics import BrokerMetrics
from broker.model import GpuInfo, JobSpec

METRICS_DOC = (ROOT / "docs" / "metrics.md").read_text()
RUNBOOKS = (ROOT / "docs" / "runbooks.md").read_text()
AGENT_METRICS = (
    "rigshift_gpu_power_watts",
    "rigshift_gpu_energy_joules_total",
    "rigshift_gpu_temperature_celsius",
    "rigshift_gpu_utilization_ratio",
    "rigshift_gpu_state",
    "rigshift_gpu_ask_price_usd_per_gpu_hour",
    "rigshift_agent_heartbeat_rtt_seconds",
    "rigshift_agent_jobs_running",
    "rigshift_gpu_power_limit_watts",
    "rigshift_agent_curtailed",
)


def _anchors(markdown: str) -> set[str]:
    """GitHub-style anchors of the markdown headings."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return out


def _documented(name: str) -> bool:
    return f"`{name}`" in METRICS_DOC


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_has_annotations_and_a_runbook_section(rule):
    annotations = rule.get("annotations", {})
    assert {"summary", "description", "runbook_url"} <= set(annotations), rule["alert"]
    assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}
    path, _, anchor = annotations["runbook_url"].partition("#")
    assert path == "docs/runbooks.md"
    assert anchor == rule["alert"].lower()
    assert anchor in _anchors(RUNBOOKS), f"docs/runbooks.md has no section {rule['alert']}"


def test_every_rule_has_a_promtool_test():
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing = {
        t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]
    }
    quiet = {
        t["alertname"]
        for case in tests
        for t in case.get("alert_rule_test", [])
        if not t["exp_alerts"]
    }
    alerts = {r["alert"] for r in alert_rules()}
    assert alerts - firing == set(), "alerts never seen firing in rigshift_rules_test.yml"
    assert alerts - quiet == set(), "alerts never seen quiet in rigshift_rules_test.yml"
    exprs = " ".join(t["expr"] for case in tests for t in case.get("promql_expr_test", []))
    untested = [r["record"] for r in recording_rules() if r["record"] not in exprs]
    assert not untested, f"recording rules without a promql_expr_test: {untested}"


def test_runbooks_have_no_section_without_an_alert():
    alerts = {r["alert"].lower() for r in alert_rules()}
    sections = {a for a in _anchors(RUNBOOKS) if a.startswith("rigshift")}
    assert sections == alerts


def test_every_metric_in_rules_and_dashboards_is_documented():
    used = set()
    for rule in alert_rules() + recording_rules():
        used |= metric_names(rule["expr"])
    for _, _, expr in panel_queries():
        used |= metric_names(expr)
    undocumented = sorted(n for n in used if not _documented(n))
    assert not undocumented, f"not in docs/metrics.md: {undocumented}"
    for rule in recording_rules():
        assert _documented(rule["record"]), rule["record"]


def test_every_agent_metric_is_documented():
    assert [n for n in AGENT_METRICS if not _documented(n)] == []


def test_the_agent_exports_exactly_the_documented_names():
    source = ROOT / "worker_agent" / "metrics.py"
    exported = set(re.findall(r'"(rigshift_[a-z_]+)"', source.read_text()))
    exported = {n.removesuffix("_total") for n in exported}
    assert exported == {n.removesuffix("_total") for n in AGENT_METRICS}


def test_every_broker_metric_is_documented():
    core = BrokerCore()
    registry = CollectorRegistry()
    metrics = BrokerMetrics(core, registry)
    gpu = GpuInfo(0, "u", "RTX 3090", 24576, 350, 300_000)
    for ev in (
        WorkerRegistered(0.0, "w", "f", "h", "1", (gpu,)),
        JobSubmitted(0.0, "j", "o", JobSpec(command=("x",))),
        SchedulePass(1.0),
    ):
        metrics.observe(ev, core.handle(ev), 0.0)
    families = {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}
    assert [n for n in sorted(families) if not _documented(n)] == []


def test_dashboards_are_grafana_dashboard_json():
    boards = dashboards()
    assert set(boards) == {"fleet.json", "earnings.json", "sla.json"}
    uids = set()
    for name, board in boards.items():
        assert board["schemaVersion"] >= 36, name
        assert board["uid"] not in uids
        uids.add(board["uid"])
        assert board["title"].startswith("Rigshift / ")
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            assert panel["datasource"]["type"] == "prometheus", panel["title"]
            assert panel["targets"], panel["title"]
            assert panel["type"] in {"timeseries", "stat", "gauge"}
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24
            for target in panel["targets"]:
                assert target["expr"] and target["refId"], panel["title"]
                assert target["datasource"] == panel["datasource"]


def test_provisioning_points_at_the_dashboards_and_the_datasource():
    datasources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "rigshift.yml").read_text()
    )["datasources"]
    providers = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "rigshift.yml").read_text()
    )["providers"]
    assert [d["uid"] for d in datasources] == ["rigshift-prometheus"]
    assert datasources[0]["type"] == "prometheus"
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"]
    for board in dashboards().values():
        (variable,) = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
        assert variable["current"]["value"] == "rigshift-prometheus"


def test_prometheus_config_discovers_agents_through_the_broker():
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"rigshift-broker", "rigshift-agent"}
    assert jobs["rigshift-agent"]["http_sd_configs"][0]["url"].endswith("/sd")
    assert jobs["rigshift-agent"]["honor_labels"] is True
    assert config["rule_files"] == ["rigshift_rules.yml"]
