"""The replay's power policy (issue 16): simulated curves, stretched durations, capped
energy, and the command line's ``--power-policy`` / ``--max-slowdown-percent``.

An RTX 3090 rig at 350 W (reference fp16 49,700 GFLOP/s): at 10 % slowdown the broker
caps it at 245 W, where it keeps 918/1000 of its throughput and draws 700/1000 of 350 W.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from broker.ledger import charges_of, ledger_problems

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import trace_replay as tr
from replay.power import MAX, PowerSetting, capped, simulated_curve
from test_trace_replay import FLEET, ROWS, trace_csv  # noqa: F401 (a fixture)

EFFICIENT10 = PowerSetting("efficient", 10)


def test_the_simulated_curve_and_a_capped_job():
    curve = simulated_curve("RTX 3090", 350)
    assert [(p.limit_watts, p.draw_watts) for p in curve] == [
        (175, 175), (210, 210), (245, 245), (280, 280), (315, 315), (350, 350),
    ]  # fmt: skip
    assert curve[-1].fp16_gflops == 49_700
    # 1000 s uncapped at 245 W: 1000 x 1000 / 918 s at 350 x 700 / 1000 = 245 W
    duration, watts = capped(curve, 245, 1000.0, 350)
    assert duration == pytest.approx(1000 * 1000 / 918)
    assert watts == pytest.approx(245.0)
    assert capped(curve, 0, 1000.0, 350) == (1000.0, 350.0)


@pytest.mark.parametrize(("setting", "label"), [(MAX, "max"), (EFFICIENT10, "efficient-10")])
def test_labels(setting, label):
    assert setting.label == label


def test_power_settings_from_the_flags():
    assert tr.power_settings(None, None) == [MAX]
    assert tr.power_settings(["max", "efficient"], [5, 20]) == [
        MAX, PowerSetting("efficient", 5), PowerSetting("efficient", 20),
    ]  # fmt: skip
    assert tr.power_settings(["efficient"], None) == [EFFICIENT10]


def test_efficient_caps_stretch_jobs_and_save_energy(trace_csv):  # noqa: F811
    fleet = tr.build_fleet(FLEET)
    trace = tr.load_trace(trace_csv, max_gang=fleet.max_gang)
    uncapped, _ = tr.replay(trace, fleet, "default")
    out, core = tr.replay(trace, fleet, "default", power=EFFICIENT10)
    assert out.power == "efficient-10" and uncapped.power == "max"
    assert out.finished == uncapped.finished == ROWS - trace.too_wide
    by_id = {j.job_id: j for j in trace.jobs}
    rigs = {r.worker_id: r for r in fleet.rigs}
    for job in core.jobs.values():
        (a,) = job.attempts
        rig = rigs[a.worker_id]
        curve = simulated_curve(rig.model, rig.watts)
        assert a.power_limit_watts > 0  # every GPU is capped under efficient
        duration, watts = capped(
            curve, a.power_limit_watts, by_id[job.job_id].duration_s, rig.watts
        )
        assert a.end_time - a.start_time == pytest.approx(duration, abs=1e-6)
        assert a.energy_joules == round(watts * (a.end_time - a.start_time) * len(a.gpu_indices))
        if rig.model == "RTX 3090":
            assert a.power_limit_watts == 245
    assert out.kwh < uncapped.kwh
    assert out.kwh_saved > 0
    assert out.gpu_hours > uncapped.gpu_hours  # capped jobs run (and bill) longer
    # (mean JCT is not asserted: longer runs change the queue, not always for the worse)
    assert out.revenue_usd_per_kwh > uncapped.revenue_usd_per_kwh
    assert ledger_problems(core.ledger, charges_of(core.jobs.values())) == []


def test_command_line_power_policies(trace_csv, tmp_path, capsys):  # noqa: F811
    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps(FLEET))
    argv = [str(trace_csv), "--fleet", str(fleet), "--json", "--processes", "1"]
    argv += ["--policy", "default", "--power-policy", "max", "--power-policy", "efficient"]
    assert tr.main([*argv, "--max-slowdown-percent", "5", "--max-slowdown-percent", "20"]) == 0
    out = capsys.readouterr().out
    assert "| policy | power |" in out
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last["policies"]) == {"default/max", "default/efficient-5", "default/efficient-20"}
    kwh = [last["policies"][k]["kwh"] for k in ("default/max", "default/efficient-5")]
    assert kwh[1] < kwh[0]
    with pytest.raises(SystemExit):
        tr.main([*argv, "--max-slowdown-percent", "51"])
