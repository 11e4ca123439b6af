"""deploy/grafana/README.md lists every panel of every dashboard and the metrics it reads."""

from __future__ import annotations

import re

from prom_helpers import GRAFANA_DIR, dashboards

README = GRAFANA_DIR / "README.md"
# A metric or recording-rule name, or `up`: not a function (`(` after it), not inside a
# label value (`"` before it; `job="rigshift-broker"` has no `_` or `:` after rigshift).
_NAME = re.compile(r'(?<!")\b(rigshift[_:][a-zA-Z0-9_:]*|up)\b(?!\s*\()')
_SECTION = re.compile(r"^### .*\(`(?P<file>[a-z]+\.json)`\)$")
_ROW = re.compile(r"^\| (?P<title>[^|`]+?) \| (?P<metrics>`[^|]*`) \|$")


def read_names(expr: str) -> set[str]:
    """Metric names an expression reads, as written (histogram suffixes kept)."""
    return set(_NAME.findall(expr))


def readme_tables() -> dict[str, dict[str, set[str]]]:
    """Dashboard file -> panel title -> metric names, from the README's tables."""
    tables: dict[str, dict[str, set[str]]] = {}
    current: dict[str, set[str]] | None = None
    for line in README.read_text().splitlines():
        if section := _SECTION.match(line):
            current = tables.setdefault(section["file"], {})
        elif current is not None and (row := _ROW.match(line)):
            current[row["title"]] = set(re.findall(r"`([^`]+)`", row["metrics"]))
    return tables


def test_read_names_finds_selectors_ranges_and_recording_rules():
    expr = (
        'sum(up{job="rigshift-broker"}) + rigshift:farm_energy_kwh:increase1h'
        " + sum(rate(rigshift_a_bucket[1m])) + max(rigshift_b)"
    )
    assert read_names(expr) == {
        "up",
        "rigshift:farm_energy_kwh:increase1h",
        "rigshift_a_bucket",
        "rigshift_b",
    }


def test_readme_lists_every_panel_and_the_metrics_it_reads():
    expected = {
        name: {
            panel["title"]: set().union(*(read_names(t["expr"]) for t in panel["targets"]))
            for panel in board["panels"]
        }
        for name, board in dashboards().items()
    }
    assert readme_tables() == expected, "update the tables in deploy/grafana/README.md"


def test_readme_documents_the_regeneration_command():
    text = README.read_text()
    assert "python deploy/grafana/build_dashboards.py" in text
    assert "build_dashboards.py --check" in text
