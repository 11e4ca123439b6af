"""Helpers of the observability tests: paths, the Prometheus binaries, rules and dashboards.

These tests need Debian's ``prometheus`` package (``prometheus`` and ``promtool``
on PATH; ``.ci/run`` installs it). Without it they are skipped on a developer
machine but fail in CI (``CI`` set), so a CI image without Prometheus cannot
pass them silently.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
RULES = PROMETHEUS_DIR / "rigshift_rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rigshift_rules_test.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
SHARED_CONFTEST = ROOT / "tests" / "conftest.py"

# protocol_agent.py (a test-side agent speaking the real WorkerService protocol) lives there.
sys.path.insert(0, str(ROOT / "tests" / "integration"))


def start_broker(home: Path, **overrides: Any) -> Any:
    """``start_broker`` of tests/conftest.py (loaded by path: every conftest is named conftest)."""
    global _shared
    if _shared is None:
        spec = importlib.util.spec_from_file_location("rigshift_tests_conftest", SHARED_CONFTEST)
        assert spec is not None and spec.loader is not None
        _shared = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = _shared
        spec.loader.exec_module(_shared)
    return _shared.start_broker(home, **overrides)


_shared: Any = None


def binary(name: str) -> str:
    """Path of a Prometheus binary; skip without it, unless in CI where that is a failure."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (CI must install Debian's prometheus package)")
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
    )


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["groups"]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def recording_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "record" in r]


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        p.name: json.loads(p.read_text())
        for p in sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
    }


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every target of every panel."""
    out = []
    for name, board in dashboards().items():
        for panel in board["panels"]:
            for target in panel["targets"]:
                out.append((name, panel["title"], target["expr"]))
    return out


# Grafana's template variables, replaced by what they stand for in a plain query.
TEMPLATE_VARS = {"$__rate_interval": "1m", "$farm": ".*", "${farm}": ".*"}


def concrete(expr: str) -> str:
    """A dashboard expression with its Grafana variables filled in."""
    for var, value in TEMPLATE_VARS.items():
        expr = expr.replace(var, value)
    return expr


_SELECTOR = re.compile(r"\b((?:rigshift[a-zA-Z0-9_:]*)|up)\b(\{[^}]*\})?")


def selectors(expr: str) -> list[str]:
    """The vector selectors (metric name plus matchers) an expression reads."""
    return sorted({m.group(1) + (m.group(2) or "") for m in _SELECTOR.finditer(expr)})


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads, with histogram suffixes taken off."""
    names = set()
    for m in _SELECTOR.finditer(expr):
        name = m.group(1)
        if ":" in name or name == "up":
            continue
        names.add(re.sub(r"_(bucket|count|sum)$", "", name))
    return names
