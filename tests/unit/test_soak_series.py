"""benchmarks/soakbench: the samples file of a soak series, its figures, the optional plot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from soakbench.plot import write_plot
from soakbench.series import START_JOBS, Interval, Series, percentile


def sample(jobs: int, rss_mb: float, run: int = 0, run_jobs: int | None = None) -> dict[str, Any]:
    return {
        "run": run,
        "jobs_completed": jobs,
        "run_jobs_completed": jobs if run_jobs is None else run_jobs,
        "rss_mb": rss_mb,
        "db_bytes": jobs * 1000,
        "lifecycles_per_s": 100.0,
        **Interval(submit_to_assign=[1.0, 2.0], create=[3.0], get=[]).figures(),
    }


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 99, None),
        ([5.0], 99, 5.0),
        ([3.0, 1.0, 2.0], 50, 2.0),  # rank ceil(0.5*3) = 2 of [1, 2, 3]
        ([float(i) for i in range(1, 101)], 99, 99.0),  # rank 99 of 1..100
        ([float(i) for i in range(1, 1001)], 99, 990.0),  # rank 990 of 1..1000
    ],
)
def test_percentile_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_interval_figures_name_every_latency() -> None:
    figures = Interval(submit_to_assign=[10.0, 20.0], create=[1.0], get=[]).figures()
    assert figures == {
        "submit_to_assign_p50_ms": 10.0,
        "submit_to_assign_p99_ms": 20.0,
        "create_job_p50_ms": 1.0,
        "create_job_p99_ms": 1.0,
        "get_job_p50_ms": None,
        "get_job_p99_ms": None,
    }


def test_series_continues_across_runs(tmp_path: Path) -> None:
    path = tmp_path / "soak-samples.json"
    first = Series(path)
    assert first.jobs_completed == 0 and first.rss_mb_start() is None
    first.add_sample(sample(5_000, 100.0))
    first.add_sample(sample(START_JOBS, 110.0))
    first.add_run({"jobs_completed": START_JOBS})
    second = Series(path)  # a later run on the same home reads the series back
    assert second.jobs_completed == START_JOBS
    second.add_sample(sample(START_JOBS + 500, 120.0, run=1, run_jobs=500))
    second.add_run({"jobs_completed": 500})
    third = Series(path)
    assert third.jobs_completed == START_JOBS + 500
    assert [s["jobs_completed"] for s in third.samples] == [5_000, START_JOBS, START_JOBS + 500]
    assert third.rss_mb_start() == 110.0  # the first sample at or past START_JOBS
    assert third.rss_mb_end() == 120.0
    assert not path.with_name(path.name + ".tmp").exists()


def test_series_shorter_than_start_uses_first_sample(tmp_path: Path) -> None:
    series = Series(tmp_path / "s.json")
    series.add_sample(sample(100, 90.0))
    series.add_sample(sample(300, 95.0))
    assert series.rss_mb_start() == 90.0


def test_plot_without_matplotlib_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    out = tmp_path / "soak.png"
    why = write_plot([sample(100, 90.0)], out, "t")
    assert "matplotlib" in why and "bench" in why
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="bench extra")
def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "soak.png"
    samples = [sample(1_000, 90.0), sample(2_000, 91.0), sample(3_000, 92.0, 1, 1_000)]
    assert write_plot(samples, out, "t") == ""
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
