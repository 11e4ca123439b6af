"""Table-driven tests of the client's economics: parsers, UpdateFarm masks, SDK requests, output.

No broker here: the SDK's stubs are swapped for recorders, and CLI tests stop
at usage errors, which click raises before any RPC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from google.protobuf import timestamp_pb2

from client import output
from client.errors import InvalidArgument
from client.sdk import (
    UPDATABLE_FARM_FIELDS,
    Client,
    build_update_farm_request,
    group_by_value,
    tier_value,
)
from client.units import (
    format_permille_percent,
    milliseconds_to_hours,
    parse_model_price,
    parse_since,
    parse_tariff_file,
    percent_to_permille,
)
from rigshift.cli import main
from rigshift.v1 import farm_pb2, farm_service_pb2, job_pb2, job_service_pb2

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)

# -- the time-of-use tariff file ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "windows"),
    [
        ("17-21 0.31\n", [(17, 21, 310_000)]),
        ("", []),
        ("# only a comment\n\n   \n", []),
        (
            "# peak hours\n17-21 0.31   # evening\n\n22-6 $0.08\n",
            [(17, 21, 310_000), (22, 6, 80_000)],  # 22-6 wraps past midnight
        ),
        ("0-24 0.10", [(0, 24, 100_000)]),  # the whole day
        ("23-24 0.2\n0-1 0.2", [(23, 24, 200_000), (0, 1, 200_000)]),
        ("  7-9\t0.000001  ", [(7, 9, 1)]),
        ("06-08 0.15\r\n08-10 0.16\r\n", [(6, 8, 150_000), (8, 10, 160_000)]),  # touching is fine
    ],
)
def test_parse_tariff_file(text: str, windows: list[tuple[int, int, int]]) -> None:
    assert parse_tariff_file(text) == windows


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("17-21\n", "line 1: expected 'START-END USD_PER_KWH'"),
        ("# ok\n17 - 21 0.31\n", "line 2: expected 'START-END USD_PER_KWH'"),
        ("17-21 0.31 extra\n", "line 1: expected"),
        ("17:00-21:00 0.31\n", "line 1: expected"),
        ("-1-5 0.1\n", "line 1: expected"),
        ("24-2 0.1\n", "line 1: start hour must be 0-23 (got 24)"),
        ("1-0 0.1\n", "line 1: end hour must be 1-24 (got 0)"),
        ("1-25 0.1\n", "line 1: end hour must be 1-24 (got 25)"),
        ("5-5 0.1\n", "line 1: empty window 5-5"),
        ("1-2 abc\n", "line 1: amount in USD: not a number"),
        ("1-2 -0.1\n", "line 1: amount in USD: must not be negative"),
        ("1-2 0.0000001\n", "line 1: amount in USD: finer than one micro-dollar"),
        (
            "17-21 0.31\n\n20-22 0.2\n",
            "line 3: window 20-22 overlaps the window on line 1 at hour 20",
        ),
        ("22-6 0.08\n5-7 0.1\n", "line 2: window 5-7 overlaps the window on line 1 at hour 5"),
        ("0-24 0.1\n3-4 0.2\n", "line 2: window 3-4 overlaps the window on line 1 at hour 3"),
    ],
)
def test_parse_tariff_file_rejects_naming_the_line(text: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_tariff_file(text)
    assert str(info.value).startswith(error), str(info.value)


# -- --since -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", NOW - timedelta(hours=24)),
        ("7d", NOW - timedelta(days=7)),
        ("30m", NOW - timedelta(minutes=30)),
        ("90s", NOW - timedelta(seconds=90)),
        ("2w", NOW - timedelta(weeks=2)),
        (" 1h ", NOW - timedelta(hours=1)),
        ("0h", NOW),
        ("2025-01-31", datetime(2025, 1, 31, tzinfo=UTC)),  # a date is midnight UTC
        ("2025-01-31T12:00:00Z", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-01-31T12:00:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),  # no zone: UTC
        ("2025-01-31 14:00+02:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-06-01T12:00:00Z", NOW),  # exactly now is not the future
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    got = parse_since(text, now=NOW)
    assert got == expected
    assert got.tzinfo is not None and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "expected a duration"),
        ("24", "expected a duration"),
        ("h", "expected a duration"),
        ("1.5h", "expected a duration"),
        ("-1h", "expected a duration"),
        ("24H", "expected a duration"),
        ("3y", "expected a duration"),
        ("yesterday", "expected a duration"),
        ("2025-13-01", "expected a duration"),
        ("2025-06-02", "in the future"),
        ("2025-06-01T12:00:01Z", "in the future"),
        ("99999999999d", "too far back"),
    ],
)
def test_parse_since_rejects(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_since(text, now=NOW)


def test_parse_since_defaults_to_now() -> None:
    before = datetime.now(UTC)
    got = parse_since("1h")
    assert before - timedelta(hours=1, seconds=5) <= got <= datetime.now(UTC) - timedelta(hours=1)


# -- MODEL=PRICE and percentages -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("RTX 3090=0.35", ("RTX 3090", 350_000)),
        ("  RTX 3090 = $0.35 ", ("RTX 3090", 350_000)),
        ("A100=2", ("A100", 2_000_000)),
        ("H100=0", ("H100", 0)),
        ("weird=model=0.1", ("weird=model", 100_000)),  # the price follows the last '='
    ],
)
def test_parse_model_price(text: str, pair: tuple[str, int]) -> None:
    assert parse_model_price(text) == pair


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("RTX 3090", "expected MODEL=USD"),
        ("=0.35", "expected MODEL=USD"),
        ("RTX 3090=", "expected MODEL=USD"),
        ("RTX 3090= ", "expected MODEL=USD"),
        ("RTX 3090=abc", "RTX 3090: amount in USD: not a number"),
        ("RTX 3090=-1", "RTX 3090: amount in USD: must not be negative"),
        ("RTX 3090=0.0000001", "RTX 3090: amount in USD: finer than one micro-dollar"),
    ],
)
def test_parse_model_price_rejects(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_model_price(text, "--ask")


@pytest.mark.parametrize(
    ("text", "permille"),
    [("10", 100), ("12.5", 125), ("0", 0), ("100", 1000), ("7%", 70), (Decimal("2.5"), 25)],
)
def test_percent_to_permille(text: str | Decimal, permille: int) -> None:
    assert percent_to_permille(text) == permille


@pytest.mark.parametrize("text", ["100.1", "-1", "12.55", "abc", "", "NaN"])
def test_percent_to_permille_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        percent_to_permille(text)


@pytest.mark.parametrize(
    ("permille", "text"), [(998, "99.8%"), (1000, "100.0%"), (0, "0.0%"), (5, "0.5%")]
)
def test_format_permille_percent(permille: int, text: str) -> None:
    assert format_permille_percent(permille) == text


@pytest.mark.parametrize(
    ("ms", "hours"), [(5_400_000, "1.500"), (0, "0.000"), (1_801, "0.001"), (1_800, "0.000")]
)
def test_milliseconds_to_hours(ms: int, hours: str) -> None:
    assert milliseconds_to_hours(ms) == Decimal(hours)


# -- UpdateFarm masks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "paths"),
    [
        ({"pue_permille": 1250}, ["pue_permille"]),
        ({"tariff_micros_per_kwh": 0}, ["tariff_micros_per_kwh"]),  # 0 clears: still masked
        ({"region": ""}, ["region"]),
        ({"mining_micros_per_kwh": {}}, ["mining_micros_per_kwh"]),  # {} clears the map
        ({"tariff_windows": []}, ["tariff_windows"]),
        (
            {"ask_micros_per_gpu_hour": {"RTX 3090": 350_000}, "broker_fee_permille": 100},
            ["ask_micros_per_gpu_hour", "broker_fee_permille"],
        ),
        (
            {
                "margin_micros_per_gpu_hour": 20_000,
                "tariff_windows": [(17, 21, 310_000)],
                "pue_permille": None,  # None: not passed
            },
            ["margin_micros_per_gpu_hour", "tariff_windows"],
        ),
        (
            {
                "region": "eu",
                "tariff_micros_per_kwh": 1,
                "pue_permille": 1000,
                "mining_micros_per_kwh": {"A": 1},
                "ask_micros_per_gpu_hour": {"A": 2},
                "broker_fee_permille": 3,
                "margin_micros_per_gpu_hour": 4,
                "tariff_windows": [(1, 2, 5)],
            },
            list(UPDATABLE_FARM_FIELDS),
        ),
    ],
)
def test_update_mask_names_exactly_the_fields_passed(
    kwargs: dict[str, Any], paths: list[str]
) -> None:
    request = build_update_farm_request("abc", **kwargs)
    assert list(request.update_mask.paths) == paths
    assert request.farm.name == "farms/abc"
    for path in paths:
        value = kwargs[path]
        got = getattr(request.farm, path)
        if path == "tariff_windows":
            assert [(w.start_hour, w.end_hour, w.micros_per_kwh) for w in got] == list(value)
        elif isinstance(value, dict):
            assert dict(got) == value
        else:
            assert got == value
    # every field outside the mask stays at its default in the message
    assert {f.name for f, _ in request.farm.ListFields()} <= {"name", *paths}


def test_update_mask_paths_are_farm_fields() -> None:
    names = {f.name for f in farm_pb2.Farm.DESCRIPTOR.fields}
    assert set(UPDATABLE_FARM_FIELDS) <= names
    assert {"name", "enrollment_token", "floors", "create_time"}.isdisjoint(UPDATABLE_FARM_FIELDS)


def test_update_mask_accepts_resource_names() -> None:
    assert build_update_farm_request("farms/abc", pue_permille=1).farm.name == "farms/abc"


def test_update_with_nothing_is_refused() -> None:
    with pytest.raises(InvalidArgument) as info:
        build_update_farm_request("abc")
    assert info.value.reason == "EMPTY_UPDATE"
    with pytest.raises(InvalidArgument):
        build_update_farm_request("a/b/c", pue_permille=1)


# -- tiers and grouping ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "value"),
    [
        ("guaranteed", job_pb2.GUARANTEED),
        ("SPOT", job_pb2.SPOT),
        (" Spot ", job_pb2.SPOT),
        (job_pb2.SPOT, job_pb2.SPOT),
        (0, job_pb2.TIER_UNSPECIFIED),
    ],
)
def test_tier_value(tier: str | int, value: int) -> None:
    assert tier_value(tier) == value


@pytest.mark.parametrize("tier", ["premium", "", 7, True, None])
def test_tier_value_rejects(tier: Any) -> None:
    with pytest.raises(InvalidArgument):
        tier_value(tier)


def test_group_by_value() -> None:
    e = farm_service_pb2.GetEarningsRequest
    assert [group_by_value(g) for g in ("farm", "Worker", "GPU")] == [e.FARM, e.WORKER, e.GPU]
    with pytest.raises(InvalidArgument):
        group_by_value("rig")


# -- the SDK's requests, recorded -------------------------------------------------------


class _Recorder:
    """Stands in for a gRPC stub: records each request and answers with a canned message."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, method: str) -> Any:
        def call(request: Any, timeout: float, metadata: Any) -> Any:
            self.calls.append((method, request))
            return self.answers[method]

        return call


@pytest.fixture
def recorded() -> Any:
    client = Client("127.0.0.1:1")
    jobs = _Recorder(
        {"CreateJob": job_pb2.Job(name="jobs/j"), "QuoteJob": job_service_pb2.QuoteJobResponse()}
    )
    farms = _Recorder(
        {
            "CreateFarm": farm_pb2.Farm(name="farms/f"),
            "UpdateFarm": farm_pb2.Farm(name="farms/f"),
            "GetEarnings": farm_service_pb2.GetEarningsResponse(),
        }
    )
    client._jobs, client._farms = jobs, farms  # type: ignore[assignment]
    yield client, jobs, farms
    client.close()


def test_sdk_create_job_and_quote_send_the_tier(recorded: Any) -> None:
    client, jobs, _ = recorded
    client.create_job(["python", "t.py"], tier="spot", gpu_count=2)
    client.create_job(["python", "t.py"])
    client.quote_job(gpu_model="RTX 3090", tier="spot", max_price_micros_per_gpu_hour=400_000)
    (_, spot), (_, default), (method, quote) = jobs.calls
    assert spot.spec.tier == job_pb2.SPOT and spot.spec.gpu_count == 2
    assert default.spec.tier == job_pb2.GUARANTEED
    assert method == "QuoteJob"
    assert list(quote.spec.command) == ["true"]
    assert quote.spec.gpu_model == "RTX 3090" and quote.spec.tier == job_pb2.SPOT
    assert quote.spec.max_price_micros_per_gpu_hour == 400_000
    with pytest.raises(InvalidArgument):
        client.create_job(["x"], tier="gold")
    with pytest.raises(TypeError):
        client.quote_job("python t.py")


def test_sdk_create_farm_carries_the_economics(recorded: Any) -> None:
    client, _, farms = recorded
    client.create_farm(
        "north",
        region="eu",
        tariff_micros_per_kwh=120_000,
        pue_permille=1250,
        mining_micros_per_kwh={"RTX 3090": 80_000},
        ask_micros_per_gpu_hour={"RTX 3090": 350_000},
        broker_fee_permille=100,
        margin_micros_per_gpu_hour=20_000,
        tariff_windows=[(17, 21, 310_000)],
    )
    ((method, request),) = farms.calls
    f = request.farm
    assert method == "CreateFarm"
    assert (f.display_name, f.region, f.tariff_micros_per_kwh, f.pue_permille) == (
        "north",
        "eu",
        120_000,
        1250,
    )
    assert dict(f.mining_micros_per_kwh) == {"RTX 3090": 80_000}
    assert dict(f.ask_micros_per_gpu_hour) == {"RTX 3090": 350_000}
    assert (f.broker_fee_permille, f.margin_micros_per_gpu_hour) == (100, 20_000)
    assert [(w.start_hour, w.end_hour, w.micros_per_kwh) for w in f.tariff_windows] == [
        (17, 21, 310_000)
    ]


def test_sdk_update_farm(recorded: Any) -> None:
    client, _, farms = recorded
    client.update_farm("f", margin_micros_per_gpu_hour=0)
    ((method, request),) = farms.calls
    assert method == "UpdateFarm"
    assert list(request.update_mask.paths) == ["margin_micros_per_gpu_hour"]


def test_sdk_get_earnings(recorded: Any) -> None:
    client, _, farms = recorded
    client.get_earnings()
    client.get_earnings("f", since=datetime(2025, 1, 31, 14, tzinfo=timezone(timedelta(hours=2))))
    client.get_earnings("farms/f", since=datetime(2025, 1, 31, 12), group_by="gpu")
    (_, everything), (_, aware), (_, naive) = farms.calls
    assert everything.parent == "" and not everything.HasField("since")
    assert everything.group_by == farm_service_pb2.GetEarningsRequest.FARM
    assert aware.parent == "farms/f"
    assert aware.since.ToJsonString() == "2025-01-31T12:00:00Z"
    assert naive.since.ToJsonString() == "2025-01-31T12:00:00Z"  # naive is UTC
    assert naive.group_by == farm_service_pb2.GetEarningsRequest.GPU


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
