"""Conversions between the core model and ``rigshift.v1`` messages (the wire edge)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from broker.core import Attempt, BrokerCore, Job, Worker
from broker.earnings import SettledSource, earnings
from broker.economics import FarmTerms, PowerPolicy, charge_micros, floor_price
from broker.events import Assign
from broker.model import JobSpec
from broker.records import Gpu, Quote
from broker.scheduler import Rejection
from broker.store import FarmRow, farm_terms
from rigshift.power import PowerPoint
from rigshift.scoring import Measurement, measurement_message
from rigshift.v1 import farm_pb2, farm_service_pb2, job_pb2, job_service_pb2, worker_service_pb2

__all__ = [
    "assignment_pb",
    "earnings_pb",
    "farm_pb",
    "gpu_pb",
    "job_pb",
    "measurement_from_pb",
    "measurement_pb",
    "power_curve_from_pb",
    "power_curve_pb",
    "quote_pb",
    "reason_pb",
    "timestamp",
    "worker_pb",
]


def timestamp(t: float | None) -> Timestamp | None:
    """Seconds since the epoch -> Timestamp (None stays None)."""
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def spec_pb(spec: JobSpec) -> job_pb2.JobSpec:
    """Core JobSpec -> message."""
    return job_pb2.JobSpec(
        command=list(spec.command),
        env=dict(spec.env),
        gpu_count=spec.gpu_count,
        gpu_model=spec.gpu_model,
        min_vram_mb=spec.min_vram_mb,
        max_price_micros_per_gpu_hour=spec.max_price_micros_per_gpu_hour,
        max_duration_seconds=spec.max_duration_seconds,
        working_dir_sha256=spec.working_dir_sha256,
        max_attempts=spec.max_attempts,
        display_name=spec.display_name,
        tier=spec.tier.value,
        environment=job_pb2.Environment(
            python_requirements=spec.python_requirements,
            requirements_sha256=spec.requirements_sha256,
            image=spec.image,
        )
        if spec.python_requirements or spec.image
        else None,
        inputs=dict(spec.inputs),
        min_pcie_gbps=spec.min_pcie_mbps / 1000,
        min_host_ram_gb_per_gpu=spec.min_host_ram_gb_per_gpu,
        min_cpu_cores_per_gpu=spec.min_cpu_millicores_per_gpu / 1000,
        min_score=spec.min_score,
        allow_unverified=spec.allow_unverified,
    )


def attempt_pb(a: Attempt, now: float) -> job_pb2.Attempt:
    """Core Attempt -> message."""
    return job_pb2.Attempt(
        number=a.number,
        worker=f"workers/{a.worker_id}",
        gpu_indices=list(a.gpu_indices),
        state=a.state.value,
        start_time=timestamp(a.start_time),
        end_time=timestamp(a.end_time),
        exit_code=a.exit_code or 0,
        energy_joules=a.energy_joules,
        gpu_milliseconds=a.gpu_milliseconds(now),
        price_micros_per_gpu_hour=a.price_micros_per_gpu_hour,
        schedule_time=timestamp(a.schedule_time),
        charge_micros=a.charge_micros,
        setup_milliseconds=a.setup_ms,
        message=a.message,
    )


def job_pb(job: Job, now: float) -> job_pb2.Job:
    """Core Job -> message."""
    return job_pb2.Job(
        name=f"jobs/{job.job_id}",
        spec=spec_pb(job.spec),
        state=job.state.value,
        owner=job.owner,
        create_time=timestamp(job.create_time),
        update_time=timestamp(job.update_time),
        attempt_count=len(job.attempts),
        attempts=[attempt_pb(a, now) for a in job.attempts],
        pending_reasons=[reason_pb(r) for r in job.pending_reasons],
        status_message=job.status_message,
        exit_code=job.exit_code,
        history=[
            job_pb2.StateTransition(
                from_state=h.from_state.value if h.from_state else None,
                to_state=h.to_state.value,
                time=timestamp(h.time),
                reason=h.reason,
            )
            for h in job.history
        ],
        request_id=job.request_id,
        sla_events=[
            job_pb2.SlaEvent(
                kind=e.kind.value,
                time=timestamp(e.time),
                attempt=e.attempt,
                seconds=e.seconds,
                credit_micros=e.credit_micros,
                detail=e.detail,
            )
            for e in job.sla_events
        ],
        cost_micros=cost_so_far(job, now),
        credit_micros=job.credit_micros,
        checkpoint_sha256=job.checkpoint_sha256,
        checkpoint_time=timestamp(job.checkpoint_time),
    )


def cost_so_far(job: Job, now: float) -> int:
    """Settled charges plus the running attempt's GPU time at its price."""
    total = 0
    for a in job.attempts:
        if a.settled:
            total += a.charge_micros
        else:
            total += charge_micros(a.gpu_milliseconds(now), a.price_micros_per_gpu_hour)
    return total


def measurement_pb(m: Measurement | None) -> farm_pb2.GpuMeasurement | None:
    """A GPU's self-test figures -> message (None stays None: never measured)."""
    if m is None:
        return None
    return measurement_message(m)


def measurement_from_pb(msg: farm_pb2.GpuMeasurement) -> Measurement:
    """The self-test's figures of a message (an agent's); negative figures read as 0, texts
    are cut to 1 KiB."""
    return Measurement(
        fp16_gflops=max(0, msg.fp16_gflops),
        fp32_gflops=max(0, msg.fp32_gflops),
        usable_vram_mb=max(0, msg.usable_vram_mb),
        h2d_mbps=max(0, msg.h2d_mbps),
        d2h_mbps=max(0, msg.d2h_mbps),
        method=msg.method[:64],
        error=msg.error[:1024],
        measured_at=msg.measure_time.ToNanoseconds() / 1e9 if msg.HasField("measure_time") else 0.0,
        duration_ms=max(0, msg.duration_ms),
    )


def gpu_pb(g: Gpu) -> farm_pb2.Gpu:
    """Core Gpu -> message: QUARANTINED (with why and since when) before LEASED and IDLE;
    the broker's verification, score and the latest figures."""
    if g.quarantine_reason:
        state = farm_pb2.Gpu.QUARANTINED
    elif g.holder:
        state = farm_pb2.Gpu.LEASED
    else:
        state = farm_pb2.Gpu.IDLE
    verdict = g.verdict
    return farm_pb2.Gpu(
        index=g.info.index,
        uuid=g.info.uuid,
        model=g.info.model,
        vram_mb=g.info.vram_mb,
        power_limit_watts=g.info.power_limit_watts,
        state=state,
        price_micros_per_gpu_hour=g.info.price_micros_per_gpu_hour,
        job=f"jobs/{g.holder[0]}" if g.holder else "",
        pcie_link_width=g.info.pcie_link_width,
        quarantine_reason=g.quarantine_reason,
        quarantine_time=timestamp(g.quarantined_at) if g.quarantine_reason else None,
        reinstate_required=g.reinstate_required,
        verification=verdict.verification.value,
        verification_reason=verdict.reason,
        score=verdict.score,
        pcie_generation=g.info.pcie_generation,
        measurement=measurement_pb(g.measurement),
        power_curve=power_curve_pb(g.info.power_curve),
        ai_power_limit_watts=g.ai_power_limit_watts,
    )


def power_curve_pb(curve: tuple[PowerPoint, ...]) -> list[farm_pb2.PowerPoint]:
    """A GPU's power curve -> messages, lowest limit first."""
    return [
        farm_pb2.PowerPoint(
            limit_watts=p.limit_watts, fp16_gflops=p.fp16_gflops, draw_watts=p.draw_watts
        )
        for p in sorted(curve, key=lambda p: p.limit_watts)
    ]


def power_curve_from_pb(points: Iterable[farm_pb2.PowerPoint]) -> tuple[PowerPoint, ...]:
    """An agent's power curve: at most :data:`MAX_CURVE_POINTS` points with a positive
    limit (figures under 0 read as 0), one per limit, lowest limit first."""
    by_limit: dict[int, PowerPoint] = {}
    for p in points:
        if 0 < p.limit_watts <= 5000 and len(by_limit) < MAX_CURVE_POINTS:
            by_limit[p.limit_watts] = PowerPoint(
                p.limit_watts, max(0, p.fp16_gflops), max(0, p.draw_watts)
            )
    return tuple(by_limit[w] for w in sorted(by_limit))


MAX_CURVE_POINTS = 32
"""The most points of a power curve the broker keeps (the self-test sweeps six)."""


def worker_pb(w: Worker, core: BrokerCore | None = None, now: float = 0.0) -> farm_pb2.Worker:
    """Core Worker -> message."""
    gpus = [gpu_pb(w.gpus[index]) for index in sorted(w.gpus)]
    host = None
    if w.host_ram_mb or w.cpu_cores or w.disk_write_mbps:
        host = farm_pb2.HostInfo(
            ram_mb=w.host_ram_mb, cpu_cores=w.cpu_cores, disk_write_mbps=w.disk_write_mbps
        )
    return farm_pb2.Worker(
        name=f"workers/{w.worker_id}",
        farm=f"farms/{w.farm_id}",
        hostname=w.hostname,
        agent_version=w.agent_version,
        state=w.state.value,
        last_heartbeat_time=timestamp(w.last_heartbeat),
        gpus=gpus,
        metrics_address=w.metrics_address,
        reliability_permille=core.reliability(w, now) if core is not None else 0,
        container_runtime=farm_pb2.ContainerRuntime(name=w.runtime_name, version=w.runtime_version)
        if w.runtime_name
        else None,
        host=host,
    )


def farm_pb(
    row: FarmRow, enrollment_token: str = "", watts_by_model: dict[str, int] | None = None
) -> farm_pb2.Farm:
    """Store FarmRow -> message (the token only right after creation), with floor prices
    for every model registered in the farm or named in its tables."""
    terms = farm_terms(row)
    models = dict(watts_by_model or {})
    for model, _ in (*terms.ask_micros_per_gpu_hour, *terms.mining_micros_per_kwh):
        models.setdefault(model, 0)
    return farm_pb2.Farm(
        name=f"farms/{row.id}",
        display_name=row.display_name,
        region=row.region,
        tariff_micros_per_kwh=row.tariff_micros_per_kwh,
        pue_permille=row.pue_permille,
        enrollment_token=enrollment_token,
        create_time=timestamp(row.create_time),
        mining_micros_per_kwh=dict(terms.mining_micros_per_kwh),
        ask_micros_per_gpu_hour=dict(terms.ask_micros_per_gpu_hour),
        broker_fee_permille=terms.broker_fee_permille,
        margin_micros_per_gpu_hour=terms.margin_micros_per_gpu_hour,
        tariff_windows=[
            farm_pb2.TariffWindow(
                start_hour=w.start_hour, end_hour=w.end_hour or 24, micros_per_kwh=w.micros_per_kwh
            )
            for w in terms.tariff_windows
        ],
        floors=[_floor_pb(terms, m, w) for m, w in sorted(models.items())],
        power_policy=farm_pb2.POWER_POLICY_EFFICIENT
        if terms.power_policy == PowerPolicy.EFFICIENT
        else farm_pb2.POWER_POLICY_MAX,
        max_slowdown_percent=terms.max_slowdown_percent,
        demand_response_micros_per_mwh=terms.demand_response_micros_per_mwh,
    )


def _floor_pb(terms: FarmTerms, model: str, watts: int) -> farm_pb2.PriceFloor:
    f = floor_price(terms, model, watts or None)
    return farm_pb2.PriceFloor(
        gpu_model=model,
        watts=f.watts,
        energy_cost_micros_per_gpu_hour=f.energy_cost_micros,
        mining_micros_per_gpu_hour=f.mining_micros,
        floor_micros_per_gpu_hour=f.floor_micros,
    )


def assignment_pb(assign: Assign, max_output_bytes: int = 0) -> worker_service_pb2.Assignment:
    """What the agent needs to run one attempt, from the core's ``Assign`` alone
    (``max_output_bytes`` 0: keep no outputs)."""
    spec = assign.spec
    return worker_service_pb2.Assignment(
        job=f"jobs/{assign.job_id}",
        attempt=assign.attempt,
        spec=worker_service_pb2.AssignedSpec(
            command=list(spec.command),
            env=dict(spec.env),
            working_dir_sha256=spec.working_dir_sha256,
            max_duration_seconds=spec.max_duration_seconds,
            python_requirements=spec.python_requirements,
            requirements_sha256=spec.requirements_sha256,
            inputs=dict(spec.inputs),
            max_output_bytes=max_output_bytes,
            image=spec.image,
        ),
        gpu_indices=list(assign.gpu_indices),
        checkpoint_sha256=assign.checkpoint_sha256,
        power_limit_watts=assign.power_limit_watts,
    )


def quote_pb(quote: Quote) -> job_service_pb2.QuoteJobResponse:
    """The core's answer to QuoteJob (``BrokerCore.quote``) -> message."""
    return job_service_pb2.QuoteJobResponse(
        matching_gpus=quote.matching_gpus,
        free_matching_gpus=quote.free_matching_gpus,
        min_price_micros_per_gpu_hour=quote.min_price_micros_per_gpu_hour,
        max_price_micros_per_gpu_hour=quote.max_price_micros_per_gpu_hour,
        placeable_now=quote.placeable_now,
        reasons=[reason_pb(r) for r in quote.reasons],
        groups=[
            job_service_pb2.QuoteGroup(
                gpu_model=g.model,
                vram_mb=g.vram_mb,
                ask_micros_per_gpu_hour=g.price_micros_per_gpu_hour,
                gpus=g.gpus,
                free_gpus=g.free_gpus,
                verified=g.verified,
                score=g.score,
                pcie_gbps=g.pcie_mbps / 1000,
                host_ram_gb_per_gpu=g.ram_gb_per_gpu,
                cpu_cores_per_gpu=g.cpu_millicores_per_gpu / 1000,
            )
            for g in quote.groups
        ],
    )


def reason_pb(r: Rejection) -> job_pb2.SchedulingReason:
    """A scheduler's rejection -> message."""
    return job_pb2.SchedulingReason(
        resource=r.resource,
        requested=r.requested,
        available=r.available,
        resolvable=r.resolvable,
        message=r.message,
    )


def earnings_pb(
    core: BrokerCore,
    *,
    farm_id: str = "",
    since: float = 0.0,
    group_by: str = "farm",
    farm_name: Callable[[str], str] = str,
    now: float = float("inf"),
    source: SettledSource | None = None,
) -> farm_service_pb2.GetEarningsResponse:
    """``GetEarnings``'s answer from a core (the broker's own, or one loaded from a database);
    ``farm_name`` maps a farm id to its display name; curtailment windows count up to
    ``now``; ``source``: where the settled attempts come from (the store, in a broker)."""
    rows = []
    lines = earnings(core, farm_id=farm_id, since=since, group_by=group_by, now=now, source=source)
    for line in lines:
        rows.append(
            farm_service_pb2.EarningsRow(
                key=line.key,
                farm=f"farms/{line.farm_id}",
                gpu_model=line.gpu_model,
                gpu_milliseconds=line.gpu_milliseconds,
                energy_joules=line.energy_joules,
                kwh=line.kwh,
                revenue_micros=line.revenue_micros,
                energy_cost_micros=line.energy_cost_micros,
                margin_micros=line.margin_micros,
                revenue_usd_per_kwh=line.revenue_usd_per_kwh,
                mining_usd_per_kwh=line.mining_usd_per_kwh,
                attempts=line.attempts,
                farm_display_name=farm_name(line.farm_id),
                energy_saved_joules=line.energy_saved_joules,
                energy_cost_saved_micros=line.energy_cost_saved_micros,
                curtailed_gpu_milliseconds=line.curtailed.gpu_milliseconds,
                curtailed_energy_joules=line.curtailed.energy_joules,
                demand_response_micros=line.curtailed.demand_response_micros,
            )
        )
    return farm_service_pb2.GetEarningsResponse(rows=rows)
