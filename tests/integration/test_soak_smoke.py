"""A smoke run of ``benchmarks/soak.py`` against a real broker process (never timed).

300 job lifecycles through 5 simulated agents, then the timed restart: the final JSON line
has every figure the soak promises, with sane values, and the samples file in the soak's
home holds the curve. A second run on the same home continues the series (cumulative jobs,
one samples file). On PostgreSQL the database size comes from ``pg_database_size``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = 300
AGENTS = 5
REQUIRED = (
    "jobs_completed",
    "rss_mb_start",
    "rss_mb_end",
    "restart_s",
    "submit_to_assign_p99_ms",
    "create_job_p99_ms",
    "get_job_p99_ms",
    "lifecycles_per_s",
    "db_bytes",
    "samples_file",
    "plot",
)
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def soak(home: Path, *extra: str) -> dict[str, Any]:
    """Run the soak (tiny), return its JSON line."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--jobs", str(JOBS)]
    cmd += ["--agents", str(AGENTS), "--sample-every", "100", "--home", str(home), "--json"]
    done = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_run(result: dict[str, Any], home: Path, series_jobs: int, runs: int) -> None:
    for key in REQUIRED:
        assert key in result, key
    assert result["run_jobs_completed"] >= JOBS
    assert result["jobs_completed"] >= series_jobs
    assert result["agent_jobs_finished"] >= JOBS
    assert result["errors"] == {}
    assert result["rss_mb_start"] > 0 and result["rss_mb_end"] > 0
    assert result["rss_mb_after_restart"] > 0
    assert result["restart_s"] > 0
    assert result["submit_to_assign_p99_ms"] is not None
    assert result["submit_to_assign_p99_ms"] >= 0
    assert result["get_job_p99_ms"] is None or result["get_job_p99_ms"] > 0
    assert result["db_bytes"] > 0
    data = json.loads(Path(result["samples_file"]).read_text())
    assert Path(result["samples_file"]).parent == home
    assert len(data["runs"]) == runs
    samples = data["samples"]
    # Every 100 jobs at most once per read of the counter (0.5 s), and always at a run's end:
    # how many depends on the speed, that every run ends with one does not.
    assert {s["run"] for s in samples} == set(range(runs))
    last = [s for s in samples if s["run"] == runs - 1][-1]
    assert last["run_jobs_completed"] >= JOBS
    counts = [s["jobs_completed"] for s in samples]
    assert counts == sorted(counts) and counts[-1] == result["jobs_completed"]
    assert all(s["rss_mb"] > 0 and s["db_bytes"] > 0 for s in samples)
    if HAS_MATPLOTLIB:
        assert Path(result["plot"]).stat().st_size > 0
    else:
        assert result["plot"] == "" and "matplotlib" in result["plot_note"]


@pytest.mark.timeout(240)  # two runs; a loaded CI machine may be slow (nothing here is timed)
def test_soak_smoke_sqlite_two_runs_one_series(tmp_path: Path) -> None:
    home = tmp_path / "soak"
    first = soak(home)
    check_run(first, home, JOBS, runs=1)
    second = soak(home)
    check_run(second, home, 2 * JOBS, runs=2)
    assert second["jobs_completed"] == first["jobs_completed"] + second["run_jobs_completed"]
    # the series' start figure stays the first run's; the database grew with the history
    assert second["rss_mb_start"] == first["rss_mb_start"]
    assert second["db_bytes"] > first["db_bytes"]


@pytest.mark.timeout(150)
def test_soak_smoke_postgresql(tmp_path: Path, fresh_postgres_url: str) -> None:
    home = tmp_path / "soak-pg"
    result = soak(home, "--database-url", fresh_postgres_url)
    check_run(result, home, JOBS, runs=1)
    assert result["database"] == "postgresql"
    assert not (home / "broker-home" / "broker.db").exists()
