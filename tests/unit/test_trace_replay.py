"""Smoke test of benchmarks/trace_replay.py on a 200-row synthetic trace and two farms.

The real replay (82,247 Philly jobs) is a benchmark, never a test; this one checks that
every policy accounts for every row, that no job completes faster than it runs, that the
ledger balances, and that the lean scheduler view places exactly like the full one.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.invariants import validate_state
from broker.ledger import charges_of, ledger_problems
from broker.policy import FIFO, SHORT_FIRST, QueuedJob, ShortFirst

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import trace_replay as tr
from replay.estimator import DurationEstimator, order

ROWS = 200
FLEET = {
    "farms": [
        {
            "farm_id": "north",
            "tariff_usd_per_kwh": "0.05",
            "pue": "1.1",
            "mining_usd_per_kwh": {"RTX 3090": "0.11"},
            "ask_usd_per_gpu_hour": {"RTX 3090": "0.24"},
            "rigs": [{"model": "RTX 3090", "gpus": 8, "count": 2}],
        },
        {
            "farm_id": "south",
            "tariff_usd_per_kwh": "0.04",
            "pue": "1.3",
            "tariff_windows": [[17, 21, "0.12"]],
            "mining_usd_per_kwh": {"RTX 3060": "0.14"},
            "ask_usd_per_gpu_hour": {"RTX 3060": "0.10"},
            "rigs": [{"model": "RTX 3060", "gpus": 4, "count": 2}],
        },
    ]
}


@pytest.fixture(scope="module")
def trace_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 unsorted rows over three hours; 1-8 GPUs, and three rows too wide for any rig."""
    rnd = random.Random(7)
    path = tmp_path_factory.mktemp("trace") / "jobs.csv"
    t0 = datetime(2017, 10, 1, 12, tzinfo=UTC).timestamp()
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["timestamp", "duration", "num_gpus", "gpu_time", "cluster"])
        for i in range(ROWS):
            submit = datetime.fromtimestamp(t0 + rnd.uniform(0, 3 * 3600), UTC)
            duration = float(round(rnd.lognormvariate(7, 1.5)) + 1)
            gpus = 16 if i % 70 == 5 else rnd.choice((1, 1, 1, 1, 1, 2, 4, 8))
            stamp = submit.strftime("%Y-%m-%d %H:%M:%S")
            out.writerow([stamp, duration, gpus, duration * gpus, rnd.choice("ab")])
    return path


@pytest.fixture(scope="module")
def setup(trace_csv: Path) -> tuple[tr.Trace, tr.Fleet]:
    fleet = tr.build_fleet(FLEET)
    return tr.load_trace(trace_csv, max_gang=fleet.max_gang), fleet


@pytest.mark.parametrize("policy", tr.POLICIES)
def test_every_job_is_accounted_for_and_the_ledger_balances(
    setup: tuple[tr.Trace, tr.Fleet], policy: str
) -> None:
    trace, fleet = setup
    out, core = tr.replay(trace, fleet, policy)
    assert trace.rows == ROWS and trace.invalid == 0
    assert out.skipped == trace.too_wide == 3  # rows 5, 75 and 145 ask for 16 GPUs
    assert out.finished + out.skipped == ROWS
    for tj in trace.jobs:
        attempt = core.jobs[tj.job_id].current
        assert attempt is not None and attempt.end_time is not None
        assert attempt.end_time - tj.submit_s >= tj.duration_s
    assert ledger_problems(core.ledger, charges_of(core.jobs.values())) == []
    validate_state(core)
    assert out.revenue_usd_per_kwh > out.mining_usd_per_kwh > 0
    assert 0 < out.utilisation <= 1
    assert out.p50_jct_s <= out.p99_jct_s <= out.max_jct_s


@pytest.mark.parametrize("policy", tr.POLICIES)
def test_lean_view_places_exactly_like_the_full_snapshot(
    setup: tuple[tr.Trace, tr.Fleet], policy: str
) -> None:
    trace, fleet = setup
    runs = [tr.replay(trace, fleet, policy, lean=lean)[1] for lean in (True, False)]
    lean, full = (
        {
            j: [(a.worker_id, a.gpu_indices, a.start_time) for a in job.attempts]
            for j, job in c.jobs.items()
        }
        for c in runs
    )
    assert lean == full
    assert runs[0].ledger == runs[1].ledger


def test_short_first_is_the_cores_own_order(setup: tuple[tr.Trace, tr.Fleet]) -> None:
    """The replay does not reorder: short-first is ``BrokerCore(queue_policy=SHORT_FIRST)``
    with each job's predicted run time declared as its ``max_duration_seconds``."""
    trace, fleet = setup
    _, core = tr.replay(trace, fleet, "short-first")
    assert core.queue_policy is SHORT_FIRST
    declared = [core.jobs[tj.job_id].spec.max_duration_seconds for tj in trace.jobs]
    assert declared[0] == 0 and max(declared) > 0  # nothing finished yet: unknown
    _, oracle = tr.replay(trace, fleet, "short-first-oracle")
    for tj in trace.jobs:
        assert oracle.jobs[tj.job_id].spec.max_duration_seconds == math.ceil(tj.duration_s)
    _, default = tr.replay(trace, fleet, "default")
    assert default.queue_policy is FIFO


def test_fifo_never_backfills(setup: tuple[tr.Trace, tr.Fleet]) -> None:
    trace, fleet = setup
    _, core = tr.replay(trace, fleet, "fifo")
    starts = [core.jobs[tj.job_id].attempts[0].schedule_time for tj in trace.jobs]
    assert starts == sorted(starts)  # nobody starts before an earlier submission


def test_command_line_json(trace_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps(FLEET))
    argv = [str(trace_csv), "--fleet", str(fleet), "--json", "--processes", "1"]
    assert tr.main([*argv, "--policy", "fifo", "--policy", "short-first"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["policies"]) == {"fifo", "short-first"}
    for figures in last["policies"].values():
        assert figures["finished"] + figures["skipped"] == ROWS
        assert figures["mean_jct_s"] > 0 and figures["ledger_problems"] == []


def test_ask_under_the_floor_is_refused() -> None:
    farm = {**FLEET["farms"][0], "ask_usd_per_gpu_hour": {"RTX 3090": "0.01"}}
    with pytest.raises(SystemExit, match="under floor"):
        tr.build_fleet({"farms": [farm]})


# --- broker.policy and the replay's estimator ---------------------------------------------


def test_short_first_orders_by_expected_gpu_time_and_bounds_the_delay() -> None:
    policy = ShortFirst(stretch=2.0, max_delay_s=3600.0)
    old_big = QueuedJob("a", 0.0, gpu_count=8, estimate_s=36_000)  # delay min(576000, 3600)
    new_small = QueuedJob("b", 100.0, gpu_count=1, estimate_s=60)  # 100 + 120 = 220
    late_small = QueuedJob("c", 3601.0, gpu_count=1, estimate_s=1)  # 3601 + 2 > 0 + 3600
    ranked = sorted([old_big, new_small, late_small], key=policy.key)
    assert [j.job_id for j in ranked] == ["b", "a", "c"]
    spot = QueuedJob("d", 0.0, estimate_s=1, spot=True)
    assert SHORT_FIRST.key(spot) > SHORT_FIRST.key(old_big)  # guaranteed before spot
    assert order([old_big, new_small], now=0.0, policy=FIFO) == (
        FIFO.key(old_big),
        FIFO.key(new_small),
    )


def test_duration_estimator_falls_back_from_shape_to_owner_to_everyone() -> None:
    est = DurationEstimator(window=3)
    assert est.estimate("a", 1) == 0.0
    for d in (10, 20, 30, 1000):  # the window keeps the last three
        est.observe("a", 1, d)
    est.observe("b", 4, 7)
    assert est.estimate("a", 1) == 30  # median of 20, 30, 1000
    assert est.estimate("a", 8) == 30  # a's jobs of any size
    assert est.estimate("c", 1) == 30  # everyone's last three: 30, 1000, 7


# --- issue 15: a fleet of riser and x16 rigs of one model and price --------------------------

MIXED = {
    "farms": [
        {
            "farm_id": "mixed",
            "tariff_usd_per_kwh": "0.05",
            "pue": "1.1",
            "mining_usd_per_kwh": {"RTX 3090": "0.11"},
            "ask_usd_per_gpu_hour": {"RTX 3090": "0.24"},
            "rigs": [
                {"model": "RTX 3090", "gpus": 8, "count": 2, "pcie_link_width": 1},
                {"model": "RTX 3090", "gpus": 8, "count": 2, "pcie_gbps": 12.5},
            ],
        }
    ]
}


@pytest.fixture(scope="module")
def mixed(trace_csv: Path) -> tuple[tr.Trace, tr.Fleet]:
    fleet = tr.build_fleet(MIXED)
    return tr.load_trace(trace_csv, max_gang=fleet.max_gang), fleet


def test_fleet_file_links() -> None:
    rigs = tr.build_fleet(MIXED).rigs
    assert [(r.pcie_link_width, r.pcie_mbps, r.link_mbps) for r in rigs] == [
        (1, 0, 800),
        (1, 0, 800),
        (16, 12_500, 12_500),
        (16, 12_500, 12_500),
    ]


@pytest.mark.parametrize("scoring", tr.SCORINGS)
def test_lean_view_places_like_the_full_one_on_a_mixed_fleet(
    mixed: tuple[tr.Trace, tr.Fleet], scoring: str
) -> None:
    trace, fleet = mixed
    runs = [tr.replay(trace, fleet, "default", lean=lean, scoring=scoring)[1] for lean in (1, 0)]
    lean, full = (
        {j: [(a.worker_id, a.gpu_indices) for a in job.attempts] for j, job in c.jobs.items()}
        for c in runs
    )
    assert lean == full


def test_topology_scoring_sends_singles_to_risers_and_gangs_to_x16(
    mixed: tuple[tr.Trace, tr.Fleet],
) -> None:
    trace, fleet = mixed
    _, core = tr.replay(trace, fleet, "default", scoring="topology", gang_slowdown=2.0)
    risers = {r.worker_id for r in fleet.rigs if r.pcie_link_width == 1}
    # on a fleet with room, the first single GPU job goes to a riser, the first gang to x16
    first_single = next(tj for tj in trace.jobs if tj.gpus == 1)
    first_gang = next(tj for tj in trace.jobs if tj.gpus > 1)
    assert core.jobs[first_single.job_id].attempts[0].worker_id in risers
    assert core.jobs[first_gang.job_id].attempts[0].worker_id not in risers
    for tj in trace.jobs:  # a gang on a riser ran twice its trace duration
        a = core.jobs[tj.job_id].current
        assert a is not None and a.start_time is not None and a.end_time is not None
        slow = 2.0 if tj.gpus > 1 and a.worker_id in risers else 1.0
        assert a.end_time - a.start_time == pytest.approx(tj.duration_s * slow)
    assert ledger_problems(core.ledger, charges_of(core.jobs.values())) == []


def test_command_line_runs_both_scorings(
    trace_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    fleet = tmp_path / "mixed.json"
    fleet.write_text(json.dumps(MIXED))
    argv = [str(trace_csv), "--fleet", str(fleet), "--json", "--processes", "1"]
    assert (
        tr.main([*argv, "--policy", "default", "--scoring", "price", "--scoring", "topology"]) == 0
    )
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["policies"]) == {"default/price", "default/topology"}
    assert last["policies"]["default/topology"]["scoring"] == "topology"


def test_the_riser_mix_fleet_file_loads() -> None:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fleets" / "riser_mix.json"
    fleet = tr.build_fleet(json.loads(path.read_text()))
    widths = {r.pcie_link_width for r in fleet.rigs}
    assert widths == {1, 16} and fleet.gpus == 600
