"""The committed Grafana JSON matches deploy/grafana/build_dashboards.py: run it after editing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "grafana" / "build_dashboards.py"


def _builder():
    spec = importlib.util.spec_from_file_location("build_dashboards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_is_fresh():
    builder = _builder()
    files = builder.rendered()
    assert files, "no dashboards defined"
    out = ROOT / "deploy" / "grafana" / "dashboards"
    stale = [
        n for n, text in files.items() if not (out / n).exists() or (out / n).read_text() != text
    ]
    assert not stale, f"stale dashboard JSON (run `python {SCRIPT.relative_to(ROOT)}`): {stale}"
    assert {p.name for p in out.glob("*.json")} == set(files), (
        "JSON without a dashboard in the script"
    )


def test_check_mode_reports_stale_json(tmp_path: Path):
    builder = _builder()
    assert builder.main(["--out", str(tmp_path)]) == 0
    assert builder.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "sla.json").write_text("{}\n")
    assert builder.main(["--check", "--out", str(tmp_path)]) == 1
