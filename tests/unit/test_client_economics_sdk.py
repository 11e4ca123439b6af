"""The SDK's economics requests: UpdateFarm masks, tiers and grouping, and what
``Client`` sends (its stubs swapped for recorders: no broker here)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from client.errors import InvalidArgument
from client.sdk import (
    UPDATABLE_FARM_FIELDS,
    Client,
    build_update_farm_request,
    group_by_value,
    tier_value,
)
from rigshift.v1 import farm_pb2, farm_service_pb2, job_pb2, job_service_pb2

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
                "power_policy": 2,
                "max_slowdown_percent": 10,
                "demand_response_micros_per_mwh": 6,
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
