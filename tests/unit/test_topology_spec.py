"""Issue 15's job spec fields end to end (validation, store, GetJob, CLI, SDK), what the
scheduler sees of a rig (broker.queue), and QuoteJob's groups."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
from click.testing import CliRunner

from broker.convert import quote_pb, spec_pb
from broker.core import BrokerCore
from broker.errors import InvalidArgument
from broker.events import (
    GpuHealth,
    GpuHealthReported,
    JobSubmitted,
    SchedulePass,
    WorkerRegistered,
)
from broker.model import GpuInfo, JobSpec, WorkerState
from broker.queue import Capacities, job_request, pcie_mbps
from broker.records import Gpu, Worker
from broker.store.rows import spec_from_json, spec_to_json
from broker.validation import check_job_spec
from client import output
from client.messages import job_spec
from harness.broker_fixtures import healthy
from rigshift.scoring import Measurement, Verdict, Verification
from rigshift.v1 import job_pb2, job_service_pb2
from rigshift_cli import main

TOPOLOGY = {
    "min_pcie_gbps": 8.25,
    "min_host_ram_gb_per_gpu": 16,
    "min_cpu_cores_per_gpu": 1.5,
    "min_score": 90,
    "allow_unverified": True,
}


# --- validation ---------------------------------------------------------------------------------


def test_the_fields_become_integers_inside_the_broker() -> None:
    spec = check_job_spec(job_pb2.JobSpec(command=["x"], gpu_count=1, **TOPOLOGY), 3)
    assert (
        spec.min_pcie_mbps,
        spec.min_host_ram_gb_per_gpu,
        spec.min_cpu_millicores_per_gpu,
        spec.min_score,
        spec.allow_unverified,
    ) == (8250, 16, 1500, 90, True)
    defaults = check_job_spec(job_pb2.JobSpec(command=["x"], gpu_count=1), 3)
    assert (defaults.min_pcie_mbps, defaults.min_score, defaults.allow_unverified) == (0, 0, False)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("min_pcie_gbps", -1.0, "between 0 and 256"),
        ("min_pcie_gbps", math.nan, "between 0 and 256 (got nan)"),
        ("min_pcie_gbps", math.inf, "between 0 and 256 (got inf)"),
        ("min_pcie_gbps", 1e9, "between 0 and 256"),
        ("min_cpu_cores_per_gpu", -0.5, "between 0 and 1024"),
        ("min_cpu_cores_per_gpu", math.nan, "between 0 and 1024"),
        ("min_cpu_cores_per_gpu", 5000.0, "between 0 and 1024"),
        ("min_host_ram_gb_per_gpu", -1, "between 0 and 4096 (got -1)"),
        ("min_host_ram_gb_per_gpu", 1 << 20, "between 0 and 4096"),
        ("min_score", -5, "between 0 and 100000 (got -5)"),
        ("min_score", 10**6, "between 0 and 100000"),
    ],
)
def test_bad_values_are_field_violations(field: str, value: float, problem: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_job_spec(job_pb2.JobSpec(command=["x"], gpu_count=1, **{field: value}), 3)
    (violation,) = err.value.violations
    assert violation.field == f"spec.{field}"
    assert problem in violation.description


def test_every_bad_field_is_named_at_once() -> None:
    bad = job_pb2.JobSpec(command=["x"], gpu_count=1, min_pcie_gbps=-1, min_score=-1)
    with pytest.raises(InvalidArgument) as err:
        check_job_spec(bad, 3)
    assert {v.field for v in err.value.violations} == {"spec.min_pcie_gbps", "spec.min_score"}


# --- store and GetJob ---------------------------------------------------------------------------


def test_store_round_trip_and_old_rows() -> None:
    spec = JobSpec(
        command=("x",),
        min_pcie_mbps=8250,
        min_host_ram_gb_per_gpu=16,
        min_cpu_millicores_per_gpu=1500,
        min_score=90,
        allow_unverified=True,
    )
    assert spec_from_json(spec_to_json(spec)) == spec
    old = json.loads(spec_to_json(JobSpec(command=("x",))))
    for key in (
        "min_pcie_mbps",
        "min_host_ram_gb_per_gpu",
        "min_cpu_millicores_per_gpu",
        "min_score",
        "allow_unverified",
    ):
        del old[key]  # a row written before issue 15
    loaded = spec_from_json(json.dumps(old))
    assert loaded == JobSpec(command=("x",))
    assert loaded.allow_unverified is False


def test_getjob_shows_the_fields_as_the_client_gave_them() -> None:
    message = job_pb2.JobSpec(command=["x"], gpu_count=1, **TOPOLOGY)
    back = spec_pb(check_job_spec(message, 3))
    for field, value in TOPOLOGY.items():
        assert getattr(back, field) == pytest.approx(value)


# --- what the scheduler sees ----------------------------------------------------------------------


def _worker(*gpus: Gpu, ram_mb: int = 65_536, cores: int = 8) -> Worker:
    w = Worker("w1", "f", "rig", "1", WorkerState.ONLINE, 1e9, 0.0, host_ram_mb=ram_mb)
    w.cpu_cores = cores
    w.gpus = {g.info.index: g for g in gpus}
    return w


def _gpu(index: int, **info: Any) -> Gpu:
    return Gpu(GpuInfo(index, f"u{index}", "RTX 3090", 24_576, 350, 250_000, **info))


@pytest.mark.parametrize(
    ("info", "measured", "expected"),
    [
        ({"pcie_link_width": 1, "pcie_generation": 3}, None, 800),  # an x1 riser, estimated
        ({"pcie_link_width": 16, "pcie_generation": 4}, None, 25_600),
        ({"pcie_link_width": 16}, None, 12_800),  # generation unknown: 3
        ({"pcie_link_width": 1}, Measurement(h2d_mbps=812), 800),  # measured, floored to 100
        ({"pcie_link_width": 16}, Measurement(h2d_mbps=11_999), 11_900),
        ({"pcie_link_width": 16}, Measurement(h2d_mbps=0), 12_800),  # not measured: estimate
    ],
)
def test_pcie_figure(info: dict[str, int], measured: Measurement | None, expected: int) -> None:
    gpu = _gpu(0, **info)
    gpu.measurement = measured
    assert pcie_mbps(gpu) == expected


def test_capacity_shows_verification_score_and_host_per_gpu() -> None:
    good, pending, out = _gpu(0), _gpu(1), _gpu(2)
    good.verdict = Verdict(Verification.VERIFIED, "", 103)
    pending.verdict = Verdict(Verification.PENDING, "not measured", 0)
    out.verdict = Verdict(Verification.VERIFIED, "", 103)
    out.quarantine_reason = "XID 79: fell off the bus"
    cap = Capacities().capacity(_worker(good, pending, out, ram_mb=3 * 16_384, cores=6))
    assert [(s.index, s.verified, s.score) for s in cap.gpus] == [(0, True, 100), (1, False, 0)]
    # host figures are shared by every GPU of the rig, quarantined ones included
    assert (cap.ram_gb_per_gpu, cap.cpu_millicores_per_gpu) == (16, 2000)


def test_a_quarantined_gpu_is_neither_free_nor_counted() -> None:
    caps = Capacities()
    gpu = _gpu(0)
    gpu.verdict = Verdict(Verification.VERIFIED, "", 100)
    worker = _worker(gpu, _gpu(1))
    worker.gpus[1].verdict = gpu.verdict
    caps.update(worker, 1000)
    assert [g.gpus for g in caps.fleet.matching(job_request("q", JobSpec(("x",)), 700))] == [2]
    worker.gpus[1].quarantine_reason = "ECC double-bit error"
    caps.update(worker, 1000)
    (group,) = caps.fleet.matching(job_request("q", JobSpec(("x",)), 700))
    assert (group.gpus, group.free_gpus) == (1, 1)
    two = job_request("q", JobSpec(("x",), gpu_count=2), 700)
    assert not caps.fleet.probe(two).placements


def test_job_request_carries_the_minimums() -> None:
    spec = JobSpec(
        ("x",),
        min_pcie_mbps=8000,
        min_host_ram_gb_per_gpu=16,
        min_cpu_millicores_per_gpu=1500,
        min_score=90,
        allow_unverified=True,
    )
    r = job_request("j", spec, 700)
    assert (
        r.min_pcie_mbps,
        r.min_ram_gb_per_gpu,
        r.min_cpu_millicores_per_gpu,
        r.min_score,
        r.allow_unverified,
    ) == (8000, 16, 1500, 90, True)


# --- the core: placement and quote ---------------------------------------------------------------


def _core() -> BrokerCore:
    core = BrokerCore(lease_ttl_s=1e9)
    riser = tuple(GpuInfo(i, f"r{i}", "RTX 3090", 24_576, 350, 250_000, 1, 3) for i in range(4))
    x16 = tuple(GpuInfo(i, f"x{i}", "RTX 3090", 24_576, 350, 250_000, 16, 3) for i in range(4))
    core.handle(WorkerRegistered(0.0, "w-riser", "f", "riser", "1", riser))
    core.handle(WorkerRegistered(0.0, "w-x16", "f", "x16", "1", x16))
    return core


def test_unmeasured_gpus_take_only_jobs_that_allow_them() -> None:
    core = _core()
    core.handle(JobSubmitted(0.0, "strict", "c", JobSpec(("x",))))
    core.handle(JobSubmitted(0.0, "lenient", "c", JobSpec(("x",), allow_unverified=True)))
    core.handle(SchedulePass(1.0))
    assert core.jobs["strict"].state == "PENDING"
    (reason,) = core.jobs["strict"].pending_reasons
    assert reason.resource == "verification"
    assert "8 unverified (use --allow-unverified)" in reason.message
    lenient = core.jobs["lenient"].current
    assert lenient is not None and lenient.worker_id == "w-riser"  # one GPU: narrowest link


def test_quote_shows_the_groups_with_their_links() -> None:
    core = _core()
    spec = JobSpec(("x",), gpu_count=2, allow_unverified=True, min_pcie_mbps=4000)
    quote = core.quote(spec)
    assert quote.placeable_now and quote.matching_gpus == 4
    (group,) = quote.groups
    assert (group.pcie_mbps, group.verified, group.gpus) == (12_800, False, 4)
    message = quote_pb(quote)
    assert message.groups[0].pcie_gbps == pytest.approx(12.8)
    assert message.groups[0].verified is False
    text = output.quote_summary(message)
    assert "UNVERIFIED" in text and "12.8" in text
    refused = core.quote(dataclasses.replace(spec, min_pcie_mbps=20_000))
    assert not refused.placeable_now and refused.groups == ()
    assert refused.reasons[0].message == (
        "no worker has 2 GPUs with >= 20 GB/s PCIe: best has 12.8"
    )


def test_quote_table_renders_scores_and_verification() -> None:
    quote = job_service_pb2.QuoteJobResponse(
        matching_gpus=4,
        free_matching_gpus=4,
        placeable_now=True,
        groups=[
            job_service_pb2.QuoteGroup(
                gpu_model="RTX 3090",
                vram_mb=24_576,
                ask_micros_per_gpu_hour=250_000,
                gpus=4,
                free_gpus=3,
                verified=True,
                score=100,
                pcie_gbps=0.8,
                host_ram_gb_per_gpu=8,
                cpu_cores_per_gpu=1.5,
            )
        ],
    )
    lines = output.quote_summary(quote).splitlines()
    assert lines[2].split()[:3] == ["MODEL", "VRAM", "ASK/GPU-H"]
    row = lines[3].split()
    assert row[-6:] == ["3/4", "100", "verified", "0.8", "8", "1.5"]


# --- client: SDK keywords and CLI flags ----------------------------------------------------------


def test_sdk_builds_the_fields() -> None:
    spec = job_spec(["x"], **TOPOLOGY)  # type: ignore[arg-type]
    for field, value in TOPOLOGY.items():
        assert getattr(spec, field) == pytest.approx(value)


FLAGS = [
    "--min-pcie-gbps",
    "8.25",
    "--min-host-ram-gb-per-gpu",
    "16",
    "--min-cpu-cores-per-gpu",
    "1.5",
    "--min-score",
    "90",
    "--allow-unverified",
]


@pytest.mark.parametrize("command", ["submit", "quote"])
def test_cli_flags_reach_the_spec(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Client:
        def create_job(self, cmd: Any, **kw: Any) -> job_pb2.Job:
            seen.update(kw)
            return job_pb2.Job(name="jobs/j1")

        def quote_job(self, cmd: Any, **kw: Any) -> job_service_pb2.QuoteJobResponse:
            seen.update(kw)
            return job_service_pb2.QuoteJobResponse()

    monkeypatch.setattr("client.cli.job.broker_client", lambda: Client())
    result = CliRunner().invoke(main, ["job", command, *FLAGS, "--", "python", "t.py"])
    assert result.exit_code == 0, result.output
    assert {k: seen[k] for k in TOPOLOGY} == TOPOLOGY


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--min-pcie-gbps", "-1"), ("--min-score", "-1"), ("--min-cpu-cores-per-gpu", "x")],
)
def test_cli_refuses_bad_values_before_any_rpc(flag: str, value: str) -> None:
    result = CliRunner().invoke(main, ["job", "quote", "--broker", "127.0.0.1:1", flag, value])
    assert result.exit_code == 2


def test_the_core_stops_offering_a_gpu_the_agent_quarantines() -> None:
    core = BrokerCore(lease_ttl_s=1e9)
    rig = tuple(
        GpuInfo(i, f"g{i}", "RTX 3090", 24_576, 350, 250_000, measurement=healthy())
        for i in range(2)
    )
    core.handle(WorkerRegistered(0.0, "w", "f", "rig", "1", rig))
    spec = JobSpec(("x",), gpu_count=2)
    assert core.quote(spec).placeable_now
    core.handle(GpuHealthReported(1.0, "w", (GpuHealth(1, quarantined=True, reason="XID 79"),)))
    quote = core.quote(spec)
    assert (quote.matching_gpus, quote.placeable_now) == (1, False)
    core.handle(GpuHealthReported(2.0, "w", ()))  # it came back
    assert core.quote(spec).matching_gpus == 2
