"""The trace replay's curtailment windows (issue 16): the ``--curtail`` flag, the windows
it gives, and a one-rig replay where a window stops a job and the job resumes after it
with only the work it had left."""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.invariants import validate_state
from broker.ledger import charges_of, ledger_problems
from broker.model import AttemptState, SlaKind

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import trace_replay as tr
from replay import CurtailSpec, busiest_farm, parse_curtail, windows_for
from replay.workload import Trace, TraceJob

FLEET = {
    "farms": [
        {
            "farm_id": "small",
            "ask_usd_per_gpu_hour": {"RTX 3060": "0.10"},
            "rigs": [{"model": "RTX 3060", "gpus": 4, "count": 1}],
        },
        {
            "farm_id": "north",
            "tariff_usd_per_kwh": "0.05",
            "ask_usd_per_gpu_hour": {"RTX 3090": "0.24"},
            "rigs": [{"model": "RTX 3090", "gpus": 1, "count": 1, "watts": 350}],
        },
    ]
}
ONE_RIG = {"farms": [FLEET["farms"][1]]}

MONDAY = datetime(2017, 10, 2, tzinfo=UTC).timestamp()  # 2017-10-02 was a Monday
HOUR = 3600.0


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("busiest:weekdays:16-19", CurtailSpec("busiest", "weekdays", 16, 19)),
        ("north:all:0-24", CurtailSpec("north", "all", 0, 24)),
        ("north:all:7-8", CurtailSpec("north", "all", 7, 8)),
    ],
)
def test_parse_curtail_accepts(text: str, spec: CurtailSpec) -> None:
    assert parse_curtail(text) == spec
    assert spec.label == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("busiest:weekdays", "FARM:DAYS:START-END"),
        (":all:16-19", "FARM:DAYS:START-END"),
        ("busiest:weekends:16-19", "DAYS"),
        ("busiest:all:16", "START-END"),
        ("busiest:all:a-19", "START-END"),
        ("busiest:all:19-16", "START < END"),
        ("busiest:all:16-16", "START < END"),
        ("busiest:all:20-25", "END <= 24"),
    ],
)
def test_parse_curtail_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_curtail(text)


def test_command_line_refuses_a_bad_curtail(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        tr.main(["trace.csv", "--curtail", "busiest:sundays:16-19"])
    assert e.value.code == 2
    assert "DAYS must be one of" in capsys.readouterr().err


def test_parse_curtails_applies_include_guaranteed() -> None:
    specs = tr.parse_curtails(["north:all:1-2", "busiest:weekdays:16-19"], True)
    assert [s.include_guaranteed for s in specs] == [True, True]
    assert tr.parse_curtails(None, False) == []


def test_busiest_is_the_farm_with_most_gpus() -> None:
    assert busiest_farm(tr.build_fleet(FLEET)) == "small"  # 4 GPUs against 1
    assert busiest_farm(tr.build_fleet(FLEET, 5.0)) == "small"


@pytest.mark.parametrize(
    ("days", "count"),
    [("weekdays", 5), ("all", 7)],
)
def test_windows_over_a_week(days: str, count: int) -> None:
    fleet = tr.build_fleet(FLEET)
    spec = CurtailSpec("busiest", days, 16, 19)
    got = windows_for([spec], fleet, MONDAY, MONDAY + 7 * 86400)
    assert len(got) == count
    for n, (created, w) in enumerate(got, 1):
        assert w.curtailment_id == f"w{n}" and w.farm_id == "small"
        assert datetime.fromtimestamp(w.start_time, UTC).hour == 16
        assert w.end_time - w.start_time == 3 * HOUR
        assert created == max(MONDAY, w.start_time - 86400)  # a day ahead, or at the start
    weekdays = {datetime.fromtimestamp(w.start_time, UTC).weekday() for _, w in got}
    assert weekdays == set(range(count))


def test_windows_refuse_an_unknown_farm() -> None:
    with pytest.raises(ValueError, match="no farm 'west'"):
        windows_for([CurtailSpec("west", "all", 1, 2)], tr.build_fleet(FLEET), MONDAY, MONDAY + 1)


def _one_job() -> Trace:
    """One 1-GPU job, submitted Monday 14:30 UTC, running 2.5 h uncapped."""
    job = TraceJob("j1", MONDAY + 14.5 * HOUR, 2.5 * HOUR, 1, "alice")
    return Trace((job,), rows=1, invalid=0, too_wide=0)


@pytest.mark.parametrize(
    ("spot_percent", "include_guaranteed", "stopped_spot", "stopped_guaranteed"),
    [
        (100, False, 1, 0),  # a spot job: stopped at 16:00, resumes at 19:00
        (0, True, 0, 1),  # guaranteed, the window includes guaranteed work: the same
        (0, False, 0, 0),  # guaranteed, the window leaves it running
    ],
)
def test_a_window_stops_a_job_and_it_resumes_with_the_work_it_had_left(
    spot_percent: int, include_guaranteed: bool, stopped_spot: int, stopped_guaranteed: int
) -> None:
    fleet = tr.build_fleet(ONE_RIG)
    window = CurtailSpec("busiest", "weekdays", 16, 19, include_guaranteed)
    out, core = tr.replay(
        _one_job(),
        fleet,
        "default",
        curtail=(window,),
        spot_percent=spot_percent,
        demand_response_micros_per_mwh=50_000_000,
    )
    job = core.jobs["j1"]
    assert job.state == "SUCCEEDED" and out.finished == 1
    assert (out.interrupted_spot, out.interrupted_guaranteed) == (stopped_spot, stopped_guaranteed)
    assert out.curtail_windows == 1
    assert out.curtailed_gpu_hours == pytest.approx(3.0)  # one GPU, 16:00-19:00
    assert out.kwh_not_drawn > 0
    assert out.demand_response_usd == pytest.approx(out.kwh_not_drawn / 1000 * 50, abs=0.01)
    assert ledger_problems(core.ledger, charges_of(core.jobs.values())) == []
    validate_state(core)
    first = job.attempts[0]
    assert first.start_time == MONDAY + 14.5 * HOUR
    if not stopped_spot + stopped_guaranteed:
        assert len(job.attempts) == 1
        assert first.end_time == pytest.approx(MONDAY + 17 * HOUR)  # ran through the window
        assert out.curtailed_jobs == 0
        return
    assert first.state == AttemptState.PREEMPTED
    assert first.end_time == MONDAY + 16 * HOUR
    assert first.energy_joules == round(350 * 1.5 * HOUR)  # metered up to the window
    second = job.attempts[1]
    assert second.start_time == MONDAY + 19 * HOUR  # back on the farm once the window ends
    # Checkpointed on SIGTERM: 1.5 h done, 1 h left.
    assert second.end_time == pytest.approx(MONDAY + 20 * HOUR)
    assert [e.kind for e in job.sla_events].count(SlaKind.CURTAILED) == 1
    assert out.curtailed_jobs == 1
    assert (out.curtail_credits_usd > 0) == bool(stopped_guaranteed)  # the farm pays it
    assert out.mean_jct_s == pytest.approx(5.5 * HOUR)


def test_command_line_reports_curtailment_against_no_curtailment(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trace = tmp_path / "jobs.csv"
    with trace.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["timestamp", "duration", "num_gpus", "cluster"])
        for k in range(6):  # Monday 14:00-16:30, 1 h each
            stamp = datetime.fromtimestamp(MONDAY + (14 + k / 2) * HOUR, UTC)
            out.writerow([stamp.strftime("%Y-%m-%d %H:%M:%S"), 3600, 1, "a"])
    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps(ONE_RIG))
    argv = [str(trace), "--fleet", str(fleet), "--json", "--processes", "1"]
    argv += ["--policy", "default", "--curtail", "busiest:all:16-19", "--spot-percent", "50"]
    assert tr.main([*argv, "--demand-response-usd-per-mwh", "80"]) == 0
    text = capsys.readouterr().out
    assert "| default | busiest:all:16-19 | 1 | 3 |" in text  # the curtail table's row
    policies = json.loads(text.strip().splitlines()[-1])["policies"]
    assert set(policies) == {"default/none", "default/curtail"}
    plain, curtailed = policies["default/none"], policies["default/curtail"]
    assert plain["curtail_windows"] == 0 and curtailed["curtail_windows"] == 1
    assert curtailed["demand_response_usd"] == pytest.approx(
        curtailed["kwh_not_drawn"] / 1000 * 80, abs=0.01
    )
    assert curtailed["finished"] == plain["finished"] == 6
    assert curtailed["mean_jct_s"] > plain["mean_jct_s"]  # work waited for the window's end
