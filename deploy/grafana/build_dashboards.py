"""Rigshift's Grafana dashboards, kept as code.

    python deploy/grafana/build_dashboards.py          # write dashboards/*.json
    python deploy/grafana/build_dashboards.py --check  # exit 1 when the JSON is stale

Three dashboards: fleet & queue (ops), earnings & per-watt (farm operators) and
SLA. Every panel query uses only series documented in docs/metrics.md;
``tests/observability`` runs each one against a real Prometheus and fails on any
that errors or returns no series, and ``tests/unit/test_dashboards_fresh.py``
fails when the committed JSON differs from what this script renders.

The JSON is assembled from plain dictionaries on purpose, not with Grafana's
grafana-foundation-sdk: README.md beside this file gives the measured reasons (an
alpha, per-Grafana-release dependency of 5 MB to replace the ~90 lines of
``_panel_json`` and ``render``, checking none of what the tests above check) and
lists every panel with the metrics it reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
DATASOURCE_UID = "rigshift-prometheus"
SCHEMA_VERSION = 39
RATE = "$__rate_interval"
FARM = 'farm=~"$farm"'
# Long-lived streams would swamp a latency quantile of request/response calls.
UNARY = 'method!~".*/(StreamInstructions|WatchJob|StreamJobLogs|Watch|ServerReflectionInfo)"'


@dataclass(frozen=True)
class Query:
    """One Prometheus query of a panel."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A panel: a title, a unit, its queries and its size in grid units (24 wide)."""

    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    description: str = ""
    stack: bool = False


@dataclass(frozen=True)
class Dashboard:
    """A dashboard: rows of panels laid out left to right, top to bottom."""

    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    tags: tuple[str, ...] = ("rigshift",)
    farm_variable: bool = False
    links: list[dict[str, Any]] = field(default_factory=list)


def q(expr: str, legend: str = "") -> Query:
    return Query(" ".join(expr.split()), legend)


def p(title: str, *queries: Query, **kw: Any) -> Panel:
    return Panel(title, tuple(queries), **kw)


def _rate(metric: str, by: str, selector: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))"


def _quantile(quantile: float, metric: str, by: str, selector: str = "") -> str:
    by = f"le, {by}" if by else "le"
    return f"histogram_quantile({quantile}, {_rate(metric + '_bucket', by, selector)})"


FLEET = Dashboard(
    uid="rigshift-fleet",
    title="Rigshift / Fleet & queue",
    description="Ops view: broker health, workers and GPUs, the job queue, scheduling, RPCs.",
    panels=(
        p(
            "Broker and agents up",
            q('sum(up{job="rigshift-broker"})', "brokers up"),
            q('sum(up{job="rigshift-agent"})', "agents up"),
            q('count(up{job="rigshift-agent"})', "agents discovered"),
            kind="stat",
            width=8,
            height=5,
        ),
        p(
            "Workers by state",
            q("sum by (state) (rigshift_workers)", "{{state}}"),
            kind="stat",
            width=8,
            height=5,
        ),
        p(
            "GPU allocation",
            q(
                'sum(rigshift_gpus{state="allocated"})'
                ' / clamp_min(sum(rigshift_gpus{state=~"allocated|free"}), 1)',
                "allocated / available",
            ),
            unit="percentunit",
            kind="gauge",
            width=8,
            height=5,
        ),
        p(
            "GPUs by model and state",
            q("sum by (gpu_model, state) (rigshift_gpus)", "{{gpu_model}} {{state}}"),
            stack=True,
        ),
        p(
            "Quarantined GPUs per farm",
            q('sum by (farm) (rigshift_gpus{state="quarantined"})', "{{farm}}"),
            stack=True,
            description=(
                "GPUs their agents took out of service after a fault: no placements, no "
                "earnings. `rigshift farm workers` shows each one's reason."
            ),
        ),
        p(
            "Unverified GPUs per farm",
            q("sum by (farm) (rigshift_gpus_unverified)", "{{farm}}"),
            stack=True,
            description=(
                "GPUs whose self-test figures do not (yet) match their claimed model: placed "
                "only for jobs that accept unverified GPUs."
            ),
        ),
        p(
            "Farms in a curtailment window",
            q("max by (farm) (rigshift_farm_curtailed)", "{{farm}}"),
            stack=True,
            description=(
                "1 while a farm's curtailment window is on: no new placements, no mining; "
                "`rigshift farm curtailments FARM` lists the windows."
            ),
        ),
        p(
            "Attempts stopped by curtailment (1h)",
            q(
                "sum by (farm, tier) (increase(rigshift_curtailed_attempts_total[1h]))",
                "{{farm}} {{tier}}",
            ),
            stack=True,
            description="Attempts a curtailment window checkpointed and requeued.",
        ),
        p(
            "Jobs in flight",
            q(
                'sum by (state) (rigshift_jobs{state=~"pending|scheduled|running"})',
                "{{state}}",
            ),
            stack=True,
        ),
        p(
            "Submissions and completions",
            q(_rate("rigshift_jobs_submitted_total", "tier"), "submitted {{tier}}"),
            q(_rate("rigshift_jobs_completed_total", "state"), "{{state}}"),
            q(_rate("rigshift_jobs_requeued_total", "tier"), "requeued {{tier}}"),
            unit="ops",
        ),
        p(
            "Queue wait (PENDING to SCHEDULED)",
            q(_quantile(0.5, "rigshift_job_queue_wait_seconds", "tier"), "p50 {{tier}}"),
            q(_quantile(0.95, "rigshift_job_queue_wait_seconds", "tier"), "p95 {{tier}}"),
            q("max by (tier) (rigshift_job_queue_oldest_wait_seconds)", "oldest pending {{tier}}"),
            unit="s",
        ),
        p(
            "Placements by GPU model",
            q(_rate("rigshift_placements_total", "gpu_model"), "{{gpu_model}}"),
            unit="ops",
        ),
        p(
            "Scheduling pass duration",
            q(_quantile(0.5, "rigshift_scheduling_pass_duration_seconds", ""), "p50"),
            q(_quantile(0.99, "rigshift_scheduling_pass_duration_seconds", ""), "p99"),
            unit="s",
        ),
        p(
            "RPCs by method",
            q(_rate("rigshift_grpc_requests_total", "method"), "{{method}}"),
            unit="reqps",
        ),
        p(
            "RPC errors by method and code",
            q(
                _rate("rigshift_grpc_requests_total", "method, code", 'code!="OK"'),
                "{{method}} {{code}}",
            ),
            unit="reqps",
        ),
        p(
            "RPC latency p95 (request/response calls)",
            q(
                _quantile(0.95, "rigshift_grpc_request_duration_seconds", "method", UNARY),
                "{{method}}",
            ),
            unit="s",
        ),
        p(
            "Worker lease expirations (1h)",
            q("sum by (farm) (increase(rigshift_worker_lease_expirations_total[1h]))", "{{farm}}"),
        ),
        p(
            "Agent heartbeat round trip p95",
            q(_quantile(0.95, "rigshift_agent_heartbeat_rtt_seconds", "farm"), "{{farm}}"),
            unit="s",
        ),
        p(
            "GPU temperature (hottest per farm)",
            q("max by (farm) (rigshift_gpu_temperature_celsius)", "{{farm}}"),
            unit="celsius",
        ),
        p(
            "GPU utilisation (mean per farm)",
            q("avg by (farm) (rigshift_gpu_utilization_ratio)", "{{farm}}"),
            unit="percentunit",
        ),
        p(
            "Jobs running on agents",
            q("sum by (farm) (rigshift_agent_jobs_running)", "{{farm}}"),
            stack=True,
        ),
    ),
)

EARNINGS = Dashboard(
    uid="rigshift-earnings",
    title="Rigshift / Earnings & per-watt",
    description=(
        "Farm operators: what AI work earned per farm and per kWh, next to what mining would "
        "have paid; power and GPU state from the agents."
    ),
    farm_variable=True,
    panels=(
        p(
            "AI revenue per kWh vs mining (1h)",
            q(f"rigshift:farm_ai_revenue_usd_per_kwh:rate1h{{{FARM}}}", "AI {{farm}}"),
            q(f"max by (farm) (rigshift_farm_mining_usd_per_kwh{{{FARM}}})", "mining {{farm}}"),
            unit="currencyUSD",
            width=24,
            description="USD per kWh; mining is 0 until the farm's mining alternative is set.",
        ),
        p(
            "Revenue per hour",
            q(f"{_rate('rigshift_farm_revenue_usd_total', 'farm', FARM)} * 3600", "{{farm}}"),
            unit="currencyUSD",
            stack=True,
        ),
        p(
            "Revenue and energy (last hour)",
            q(f"rigshift:farm_revenue_usd:increase1h{{{FARM}}}", "USD {{farm}}"),
            q(f"rigshift:farm_energy_kwh:increase1h{{{FARM}}}", "kWh {{farm}}"),
        ),
        p(
            "AI energy settled, as average power",
            q(_rate("rigshift_farm_energy_joules_total", "farm", FARM), "{{farm}}"),
            unit="watt",
            stack=True,
        ),
        p(
            "GPU power: measured vs limit",
            q(f"sum by (farm) (rigshift_gpu_power_watts{{{FARM}}})", "measured {{farm}}"),
            q(f"sum by (farm) (rigshift_farm_gpu_power_limit_watts{{{FARM}}})", "limit {{farm}}"),
            q(f"sum by (farm) (rigshift_gpu_power_limit_watts{{{FARM}}})", "cap set {{farm}}"),
            unit="watt",
            description=(
                "Measured draw (agents), the GPUs' nameplate limits (broker) and the caps the "
                "agents set: a job's cap on a farm with the efficient policy, else the operator's."
            ),
        ),
        p(
            "Revenue per hour per installed kW",
            q(
                f"{_rate('rigshift_farm_revenue_usd_total', 'farm', FARM)} * 3600"
                f" / (sum by (farm) (rigshift_farm_gpu_power_limit_watts{{{FARM}}}) / 1000 > 0)",
                "{{farm}}",
            ),
            unit="currencyUSD",
        ),
        p(
            "GPU energy (agents, 24h)",
            q(
                f"sum by (farm) (increase(rigshift_gpu_energy_joules_total{{{FARM}}}[24h]))"
                " / 3.6e6",
                "{{farm}}",
            ),
            unit="kwatth",
        ),
        p(
            "Curtailment",
            q(f"max by (farm) (rigshift_farm_curtailed{{{FARM}}})", "window on {{farm}}"),
            q(f"sum by (farm) (rigshift_agent_curtailed{{{FARM}}})", "agents curtailed {{farm}}"),
            q(
                f"sum by (farm) (increase(rigshift_curtailed_attempts_total{{{FARM}}}[1h]))",
                "attempts stopped (1h) {{farm}}",
            ),
            description=(
                "The broker's window (1 while on), the agents that stopped mining for it and "
                "the AI attempts it checkpointed and requeued in the last hour."
            ),
        ),
        p(
            "GPUs by activity",
            q(f"sum by (state) (rigshift_gpu_state{{{FARM}}})", "{{state}}"),
            stack=True,
        ),
        p(
            "Ask price by GPU model",
            q(
                f"avg by (gpu_model) (rigshift_gpu_ask_price_usd_per_gpu_hour{{{FARM}}})",
                "{{gpu_model}}",
            ),
            unit="currencyUSD",
        ),
        p(
            "GPU utilisation by model",
            q(f"avg by (gpu_model) (rigshift_gpu_utilization_ratio{{{FARM}}})", "{{gpu_model}}"),
            unit="percentunit",
        ),
    ),
)

SLA = Dashboard(
    uid="rigshift-sla",
    title="Rigshift / SLA",
    description="SLA events, queue wait by tier, job outcomes and ledger health.",
    panels=(
        p(
            "SLA events per job finished (1h)",
            q(
                "sum(increase(rigshift_sla_events_total[1h]))"
                " / clamp_min(sum(increase(rigshift_jobs_completed_total[1h])), 1)",
                "events per job",
            ),
            unit="percentunit",
            kind="stat",
            width=8,
            height=5,
        ),
        p(
            "Ledger imbalance",
            q("max(abs(rigshift_ledger_imbalance_micros))", "micro-dollars"),
            kind="stat",
            width=8,
            height=5,
            description="Must be 0 at every moment.",
        ),
        p(
            "Placed within 60 s (1h)",
            q(
                'sum by (tier) (increase(rigshift_job_queue_wait_seconds_bucket{le="60.0"}[1h]))'
                " / sum by (tier) (increase(rigshift_job_queue_wait_seconds_count[1h]))",
                "{{tier}}",
            ),
            unit="percentunit",
            kind="stat",
            width=8,
            height=5,
        ),
        p(
            "SLA events by kind (1h)",
            q("sum by (kind) (increase(rigshift_sla_events_total[1h]))", "{{kind}}"),
            stack=True,
        ),
        p(
            "SLA credits by kind (1h)",
            q("sum by (kind) (increase(rigshift_sla_credits_usd_total[1h]))", "{{kind}}"),
            unit="currencyUSD",
            stack=True,
        ),
        p(
            "Queue wait p95 by tier",
            q(_quantile(0.95, "rigshift_job_queue_wait_seconds", "tier"), "{{tier}}"),
            unit="s",
        ),
        p(
            "Job outcomes (1h)",
            q("sum by (state) (increase(rigshift_jobs_completed_total[1h]))", "{{state}}"),
            stack=True,
        ),
        p(
            "Requeues and lease expirations (1h)",
            q("sum by (tier) (increase(rigshift_jobs_requeued_total[1h]))", "requeued {{tier}}"),
            q(
                "sum by (farm) (increase(rigshift_worker_lease_expirations_total[1h]))",
                "lease expired {{farm}}",
            ),
        ),
        p(
            "Attempts stopped by curtailment by tier (1h)",
            q("sum by (tier) (increase(rigshift_curtailed_attempts_total[1h]))", "{{tier}}"),
            stack=True,
            description=(
                "Guaranteed attempts here are credited to the client and charged to the farm "
                "(alert RigshiftCurtailmentStoppedGuaranteedWork)."
            ),
        ),
    ),
)

DASHBOARDS = (FLEET, EARNINGS, SLA)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend or "__auto",
            "range": True,
            "refId": chr(ord("A") + i),
        }
        for i, query in enumerate(panel.queries)
    ]
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 20 if panel.stack else 0,
            "stacking": {"mode": "normal" if panel.stack else "none"},
            "showPoints": "never",
        }
    if panel.kind == "timeseries":
        options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return {
        "datasource": DATASOURCE,
        "description": panel.description,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "id": panel_id,
        "options": options,
        "targets": targets,
        "title": panel.title,
        "type": panel.kind,
    }


def render(dashboard: Dashboard) -> dict[str, Any]:
    """Grafana dashboard JSON (schema 39) for one dashboard."""
    panels, x, y, row_height = [], 0, 0, 0
    for panel_id, panel in enumerate(dashboard.panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel_json(panel, panel_id, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    variables: list[dict[str, Any]] = [
        {
            "current": {"text": "Rigshift Prometheus", "value": DATASOURCE_UID},
            "hide": 0,
            "label": "Data source",
            "name": "datasource",
            "query": "prometheus",
            "type": "datasource",
        }
    ]
    if dashboard.farm_variable:
        variables.append(
            {
                "allValue": ".*",
                "current": {"text": "All", "value": "$__all"},
                "datasource": DATASOURCE,
                "definition": "label_values(rigshift_workers, farm)",
                "hide": 0,
                "includeAll": True,
                "label": "Farm",
                "multi": True,
                "name": "farm",
                "query": {"query": "label_values(rigshift_workers, farm)", "refId": "farm"},
                "refresh": 2,
                "sort": 1,
                "type": "query",
            }
        )
    return {
        "annotations": {"list": []},
        "description": dashboard.description,
        "editable": True,
        "graphTooltip": 1,
        "links": dashboard.links,
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": list(dashboard.tags),
        "templating": {"list": variables},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": dashboard.title,
        "uid": dashboard.uid,
        "version": 1,
    }


def rendered() -> dict[str, str]:
    """File name -> JSON text for every dashboard."""
    return {
        f"{d.uid.removeprefix('rigshift-')}.json": json.dumps(render(d), indent=2, sort_keys=True)
        + "\n"
        for d in DASHBOARDS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is stale")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    files = rendered()
    if args.check:
        stale = [n for n, text in files.items() if not _same(args.out / n, text)]
        extra = sorted({f.name for f in args.out.glob("*.json")} - set(files))
        for name in stale + extra:
            print(f"stale: {args.out / name} (run {Path(__file__).name})", file=sys.stderr)
        return 1 if stale or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
    return 0


def _same(path: Path, text: str) -> bool:
    return path.exists() and path.read_text() == text


if __name__ == "__main__":
    raise SystemExit(main())
