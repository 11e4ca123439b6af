"""What the client shows of the economics: ``client.output``'s summaries and tables, and
the CLI's usage errors, which click raises before any RPC (no broker here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from google.protobuf import timestamp_pb2

from client import output
from rigshift.v1 import farm_pb2, farm_service_pb2, job_pb2, job_service_pb2
from rigshift_cli import main

# -- output ------------------------------------------------------------------------


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def test_quote_summary() -> None:
    quote = job_service_pb2.QuoteJobResponse(
        matching_gpus=4,
        free_matching_gpus=2,
        min_price_micros_per_gpu_hour=300_000,
        max_price_micros_per_gpu_hour=450_000,
        placeable_now=True,
    )
    assert output.quote_summary(quote) == (
        "4 matching GPUs (2 free now), $0.300000\N{EN DASH}$0.450000/GPU-h for this tier; "
        "placeable now: yes"
    )
    nothing = job_service_pb2.QuoteJobResponse(
        reasons=[
            job_pb2.SchedulingReason(resource="gpu_model", message="no GPU is an H100"),
            job_pb2.SchedulingReason(resource="max_price", requested="$0.1"),
        ]
    )
    assert output.quote_summary(nothing).splitlines() == [
        "0 matching GPUs (0 free now), no price for this tier; placeable now: no",
        "  - no GPU is an H100",
        "  - max_price: $0.1",
    ]
    one = job_service_pb2.QuoteJobResponse(matching_gpus=1)
    assert output.quote_summary(one).startswith("1 matching GPU (0 free now)")


def test_describe_job_shows_money_tier_checkpoint_and_sla() -> None:
    job = job_pb2.Job(
        name="jobs/j",
        state=job_pb2.Job.RUNNING,
        spec=job_pb2.JobSpec(command=["python", "t.py"], gpu_count=1, tier=job_pb2.SPOT),
        attempt_count=2,
        cost_micros=1_234_567,
        credit_micros=50_000,
        checkpoint_sha256="ab" * 32,
        checkpoint_time=_ts(1_700_000_000),
        attempts=[
            job_pb2.Attempt(
                number=1,
                state=job_pb2.Attempt.PREEMPTED,
                end_time=_ts(1_700_000_100),
                charge_micros=1_000_000,
            ),
            job_pb2.Attempt(number=2, state=job_pb2.Attempt.RUNNING),
        ],
        sla_events=[
            job_pb2.SlaEvent(
                kind=job_pb2.SlaEvent.LOST_WORK,
                time=_ts(1_700_000_100),
                attempt=1,
                seconds=42,
                credit_micros=50_000,
                detail="42 s since the last checkpoint",
            )
        ],
    )
    text = output.describe_job(job)
    assert "tier:" in text and "SPOT" in text
    assert re.search(r"^cost so far: +\$1\.234567$", text, re.M)
    assert "credits:" in text and "$0.050000" in text
    assert f"sha256:{'ab' * 6} at 2023-11-14 22:13:20 UTC" in text
    attempts = text.split("attempts:\n")[1].split("\n\n")[0].splitlines()
    assert attempts[0].split()[-1] == "CHARGE"
    assert attempts[1].split()[-1] == "$1.000000"
    assert attempts[2].split()[-1] == "-"  # running: not charged yet
    assert "PREEMPTED" in attempts[1]
    sla = text.split("sla events:\n")[1].splitlines()
    assert sla[0].split() == ["TIME", "KIND", "ATTEMPT", "SECONDS", "CREDIT", "DETAIL"]
    assert "LOST_WORK" in sla[1] and "42 s" in sla[1] and "$0.050000" in sla[1]
    assert "42 s since the last checkpoint" in sla[1]

    plain = output.describe_job(job_pb2.Job(name="jobs/k", spec=job_pb2.JobSpec(command=["x"])))
    assert "GUARANTEED" in plain  # unset tier is guaranteed
    assert "checkpoint:" in plain and "none yet" in plain
    assert "sla events" not in plain


def test_describe_farm_shows_economics_and_floors() -> None:
    farm = farm_pb2.Farm(
        name="farms/f",
        display_name="north",
        tariff_micros_per_kwh=120_000,
        pue_permille=1250,
        mining_micros_per_kwh={"RTX 3090": 80_000},
        ask_micros_per_gpu_hour={"RTX 3090": 350_000},
        broker_fee_permille=100,
        margin_micros_per_gpu_hour=20_000,
        tariff_windows=[farm_pb2.TariffWindow(start_hour=17, end_hour=21, micros_per_kwh=310_000)],
        floors=[
            farm_pb2.PriceFloor(
                gpu_model="RTX 3090",
                watts=350,
                energy_cost_micros_per_gpu_hour=52_500,
                mining_micros_per_gpu_hour=28_000,
                floor_micros_per_gpu_hour=72_500,
            ),
            farm_pb2.PriceFloor(gpu_model="A4000", watts=140, floor_micros_per_gpu_hour=41_000),
        ],
    )
    text = output.describe_farm(farm)
    assert "$0.120000/kWh outside the time-of-use windows" in text
    assert "17-21 UTC $0.310000/kWh" in text
    assert "1.250" in text
    assert "RTX 3090 $0.080000/kWh" in text
    assert "RTX 3090 $0.350000/GPU-h" in text
    assert "10.0%" in text and "$0.020000/GPU-h" in text
    table = text.split("+ margin):\n")[1].splitlines()
    assert table[0].split() == ["MODEL", "WATTS", "ENERGY", "COST", "MINING", "FLOOR", "ASK"]
    assert table[1].split()[0] == "A4000" and table[1].split()[-1] == "agent's"
    assert table[2].split() == [
        "RTX",
        "3090",
        "350",
        "W",
        "$0.052500/GPU-h",
        "$0.028000/GPU-h",
        "$0.072500/GPU-h",
        "$0.350000/GPU-h",
    ]
    bare = output.describe_farm(farm_pb2.Farm(name="farms/g", display_name="g"))
    assert "broker default" in bare and "none yet" in bare


def test_worker_table_shows_reliability() -> None:
    workers = [
        farm_pb2.Worker(name="workers/a", reliability_permille=998),
        farm_pb2.Worker(name="workers/b"),
    ]
    lines = output.worker_table(workers).splitlines()
    assert "RELIABILITY" in lines[0]
    assert "99.8%" in lines[1]
    assert " - " in lines[2]


def test_earnings_table_marks_ai_below_mining() -> None:
    rows = [
        farm_service_pb2.EarningsRow(
            key="farms/a",
            farm="farms/a",
            gpu_model="RTX 3090",
            gpu_milliseconds=7_200_000,
            energy_joules=3_600_000,
            kwh=1.0,
            revenue_micros=600_000,
            energy_cost_micros=150_000,
            margin_micros=450_000,
            revenue_usd_per_kwh=0.6,
            mining_usd_per_kwh=0.08,
        ),
        farm_service_pb2.EarningsRow(
            key="farms/b",
            farm="farms/b",
            gpu_milliseconds=1_000,
            energy_joules=7_200_000,
            revenue_micros=10_000,
            energy_cost_micros=300_000,
            margin_micros=-290_000,
            revenue_usd_per_kwh=0.005,
            mining_usd_per_kwh=0.09,
        ),
        farm_service_pb2.EarningsRow(key="farms/c", farm="farms/c", mining_usd_per_kwh=0.09),
    ]
    lines = output.earnings_table(rows).splitlines()
    assert lines[0].split()[:4] == ["FARM", "MODEL", "GPU-HOURS", "KWH"]
    assert "AI $/KWH" in lines[0] and "MINING $/KWH" in lines[0]
    a, b, c = lines[1:]
    assert a.split()[:5] == ["farms/a", "RTX", "3090", "2.000", "1.000000"]
    assert "$0.600000" in a and "$0.6000" in a and "$0.0800" in a
    assert output.MINING_PAID_MORE not in a
    assert b.endswith(output.MINING_PAID_MORE) and "-$0.290000" in b
    assert output.MINING_PAID_MORE not in c  # no energy: no ratio, no mark
    by_gpu = output.earnings_table(
        [farm_service_pb2.EarningsRow(key="workers/w/gpus/0", farm="farms/a")], "gpu"
    )
    assert by_gpu.splitlines()[0].split()[:3] == ["GPU", "FARM", "MODEL"]


def test_to_json_defaults() -> None:
    row = farm_service_pb2.GetEarningsResponse(rows=[farm_service_pb2.EarningsRow(key="farms/a")])
    assert '"margin_micros"' not in output.to_json(row)
    assert '"margin_micros": "0"' in output.to_json(row, defaults=True)


# -- CLI usage errors (exit 2, before any RPC) ----------------------------------------------

_NOWHERE = ["--broker", "127.0.0.1:1"]


def _run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_cli_tariff_file_error_names_file_and_line(tmp_path: Path) -> None:
    table = tmp_path / "tou.txt"
    table.write_text("# tariff\n17-21 0.31\n21-23 cheap\n")
    result = _run("farm", *_NOWHERE, "create", "x", "--tariff-file", str(table))
    assert result.exit_code == 2, result.output
    assert f"{table}: line 3: amount in USD: not a number: 'cheap'" in result.stderr
    result = _run("farm", *_NOWHERE, "update", "x", "--tariff-file", str(tmp_path / "missing"))
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["update", "f"], "nothing to update"),
        (["create", "x", "--ask", "RTX 3090"], "expected MODEL=USD"),
        (["create", "x", "--ask", "A=1", "--ask", "A=2"], "'A' given twice"),
        (["create", "x", "--mining", "A=-1"], "must not be negative"),
        (["create", "x", "--broker-fee-percent", "150"], "between 0 and 100"),
        (["create", "x", "--pue", "0.5"], "between 1.0 and 10.0"),
        (["update", "f", "--margin-usd-per-gpu-hour", "x"], "not a number"),
        (["earnings", "--since", "yesterday"], "expected a duration"),
        (["earnings", "--by", "rig"], "'rig' is not one of"),
    ],
)
def test_cli_farm_usage_errors(args: list[str], error: str) -> None:
    result = _run("farm", *_NOWHERE, *args)
    assert result.exit_code == 2, result.output
    assert error in result.stderr


def test_cli_tariff_file_and_clear_exclude_each_other(tmp_path: Path) -> None:
    table = tmp_path / "tou.txt"
    table.write_text("17-21 0.31\n")
    args = ["update", "f", "--tariff-file", str(table), "--clear-tariff-windows"]
    result = _run("farm", *_NOWHERE, *args)
    assert result.exit_code == 2 and "exclude each other" in result.stderr


def test_cli_tier_choice() -> None:
    result = _run("job", *_NOWHERE, "submit", "--tier", "gold", "--", "true")
    assert result.exit_code == 2 and "'gold' is not one of" in result.stderr


def test_cli_admin_group_attached_when_the_broker_has_one() -> None:
    import broker.cli

    assert ("admin" in main.commands) == hasattr(broker.cli, "admin_group")
