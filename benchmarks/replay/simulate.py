"""The replay loop: one policy over a whole trace in virtual time, and its figures.

:func:`replay` feeds a ``BrokerCore`` -- the broker's own, with the lean scheduling view
of ``replay.view`` injected through ``BrokerCore(view=...)`` -- the events a live broker
would get (farms and rigs at the start, each job at its submit time, one
``SchedulePass`` per virtual second with events, ``AttemptStarted`` on each ``Assign``
and ``AttemptFinished`` a run time later with the energy of a board-watts power model)
and measures the result (:class:`Outcome`). Under a power setting (``replay.power``) the
broker caps each GPU and the replay stretches the job and draws the capped power.
``benchmarks/trace_replay.py`` is the command line around it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from heapq import heappop, heappush
from typing import Any

from broker.core import BrokerCore
from broker.earnings import earnings
from broker.events import (
    Assign,
    AttemptFinished,
    AttemptStarted,
    FarmConfigured,
    JobSubmitted,
    SchedulePass,
    WorkerRegistered,
)
from broker.ledger import charges_of, ledger_problems
from broker.model import GpuInfo, JobSpec, SlaKind
from broker.policy import FIFO, SHORT_FIRST
from rigshift.scoring import Measurement

from .estimator import DurationEstimator
from .power import MAX, PowerSetting, capped, simulated_curve
from .view import LeanView
from .workload import Fleet, Trace, TraceJob

__all__ = [
    "DEFAULT_POLICIES",
    "POLICIES",
    "RISER_MBPS",
    "SCORINGS",
    "Outcome",
    "declared_limit",
    "replay",
]

POLICIES = ("fifo", "default", "short-first", "short-first-oracle")
DEFAULT_POLICIES = POLICIES[:3]  # the oracle only when asked for
SCORINGS = ("topology", "price")
"""``topology``: the broker's choice (issue 15: gangs to wide links, single GPUs to narrow
ones, at equal price); ``price``: the choice before it (price, locality, best fit,
reliability; links do not count)."""

RISER_MBPS = 2000
"""A rig whose GPUs move less than this host to device is a riser rig: a gang placed on it
runs ``gang_slowdown`` times its trace duration (its GPUs exchange gradients through the
host over one lane each)."""


@dataclass(slots=True)
class Outcome:
    """Figures of one policy's replay."""

    policy: str
    scoring: str = "topology"
    power: str = "max"  # PowerSetting.label: max, or efficient-P at P % slowdown
    gang_slowdown: float = 1.0
    gangs_on_risers: int = 0  # multi-GPU jobs that ran on a riser rig
    singles_on_x16: int = 0  # single-GPU jobs that ran on a wide rig
    rows: int = 0
    finished: int = 0
    skipped: int = 0
    invalid: int = 0
    utilisation: float = 0.0
    mean_jct_s: float = 0.0
    p50_jct_s: float = 0.0
    p99_jct_s: float = 0.0
    max_jct_s: float = 0.0
    mean_queue_s: float = 0.0
    p99_queue_s: float = 0.0
    max_queue_s: float = 0.0
    sla_breaches: int = 0
    sla_credits_usd: float = 0.0
    revenue_usd_per_kwh: float = 0.0
    mining_usd_per_kwh: float = 0.0
    revenue_usd: float = 0.0
    kwh: float = 0.0
    kwh_saved: float = 0.0  # by the power caps, against the same GPU time uncapped
    gpu_hours: float = 0.0  # billed (capped jobs run longer)
    schedule_passes: int = 0
    replay_s: float = 0.0
    replay_cpu_s: float = 0.0
    ledger_problems: list[str] = field(default_factory=list)
    jct_s: list[float] = field(default_factory=list, repr=False)
    duration_s: list[float] = field(default_factory=list, repr=False)

    def figures(self) -> dict[str, Any]:
        """The JSON view (no per-job lists)."""
        out = {k: getattr(self, k) for k in self.__slots__ if k not in ("jct_s", "duration_s")}
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]


def declared_limit(policy: str, estimator: DurationEstimator, job: TraceJob) -> int:
    """The ``max_duration_seconds`` a job of the trace is submitted with under a policy.

    The core's short-first order reads a job's declared limit; Philly declares none, so
    ``short-first`` declares what the owner's finished jobs predict (0 while nothing has
    finished: unknown) and ``short-first-oracle`` the true run time. ``fifo`` and
    ``default`` declare nothing (their order does not read it).
    """
    if policy == "short-first":
        return math.ceil(estimator.estimate(job.owner, job.gpus))
    if policy == "short-first-oracle":
        return math.ceil(job.duration_s)
    return 0


def replay(
    trace: Trace,
    fleet: Fleet,
    policy: str,
    *,
    lean: bool = True,
    scoring: str = "topology",
    gang_slowdown: float = 1.0,
    power: PowerSetting = MAX,
) -> tuple[Outcome, BrokerCore]:
    """Run the whole trace under one policy; returns the figures and the final core.

    ``scoring`` is one of :data:`SCORINGS`; ``gang_slowdown`` how much longer a gang runs
    on a riser rig (:data:`RISER_MBPS`) than its trace duration (1: links do not matter).
    Every job accepts unverified GPUs: the simulated rigs report no self-test (their
    link's bandwidth at most), and verification is not what the replay measures.
    ``power``: the farms' power policy (``replay.power``; every GPU has the simulated
    curve and a settable limit)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r} (known: {', '.join(SCORINGS)})")
    started, cpu = time.perf_counter(), time.process_time()
    estimator = DurationEstimator()
    order = SHORT_FIRST if policy.startswith("short-first") else FIFO
    view = LeanView(head_of_line=policy == "fifo", lean=lean, topology=scoring == "topology")
    core = BrokerCore(queue_policy=order, view=view)
    jobs = trace.jobs
    t0 = jobs[0].submit_s if jobs else 0.0
    for terms in fleet.farms:
        core.handle(FarmConfigured(t0, power.terms(terms)))
    rigs = {r.worker_id: r for r in fleet.rigs}
    curves = {(r.model, r.watts): simulated_curve(r.model, r.watts) for r in fleet.rigs}
    for r in fleet.rigs:
        measured = Measurement(h2d_mbps=r.pcie_mbps) if r.pcie_mbps else None
        gpus = tuple(
            GpuInfo(
                i,
                f"{r.worker_id}-gpu{i}",
                r.model,
                r.vram_mb,
                r.watts,
                pcie_link_width=r.pcie_link_width,
                measurement=measured,
                power_curve=curves[(r.model, r.watts)],
                power_limit_settable=True,
            )
            for i in range(r.gpus)
        )
        core.handle(WorkerRegistered(t0, r.worker_id, r.farm_id, r.worker_id, "replay", gpus))
    by_id = {j.job_id: j for j in jobs}
    specs: dict[tuple[int, int], JobSpec] = {}  # (GPUs, declared limit) -> spec
    # (end, job_id, worker_id, attempt, watts drawn per GPU)
    finishes: list[tuple[float, str, str, int, float]] = []
    out = Outcome(
        policy,
        scoring,
        power.label,
        gang_slowdown,
        rows=trace.rows,
        skipped=trace.too_wide,
        invalid=trace.invalid,
    )
    i, n = 0, len(jobs)
    handle = core.handle
    while i < n or finishes:
        now = min(jobs[i].submit_s if i < n else math.inf, finishes[0][0] if finishes else math.inf)
        second = math.floor(now) + 1  # everything in this virtual second is one batch
        while finishes and finishes[0][0] < second:
            end, job_id, worker_id, attempt, watts = heappop(finishes)
            tj = by_id[job_id]
            ran = end - core.jobs[job_id].attempts[attempt - 1].start_time  # type: ignore[operator]
            joules = round(watts * ran * tj.gpus)
            handle(AttemptFinished(end, worker_id, job_id, attempt, 2, 0, joules))
            estimator.observe(tj.owner, tj.gpus, tj.duration_s)
            now = end
        while i < n and jobs[i].submit_s < second:
            tj = jobs[i]
            shape = (tj.gpus, declared_limit(policy, estimator, tj))
            spec = specs.get(shape)
            if spec is None:
                spec = specs[shape] = JobSpec(
                    ("trace",),
                    gpu_count=shape[0],
                    max_duration_seconds=shape[1],
                    allow_unverified=True,
                )
            handle(JobSubmitted(tj.submit_s, tj.job_id, tj.owner, spec))
            now = max(now, tj.submit_s)
            i += 1
        if not view.worth_a_pass():
            continue
        out.schedule_passes += 1
        for cmd in handle(SchedulePass(now)):
            if type(cmd) is Assign:
                tj = by_id[cmd.job_id]
                handle(AttemptStarted(now, cmd.worker_id, cmd.job_id, cmd.attempt, 1))
                riser = rigs[cmd.worker_id].link_mbps < RISER_MBPS
                duration = tj.duration_s
                if tj.gpus > 1 and riser:
                    duration *= gang_slowdown
                    out.gangs_on_risers += 1
                elif tj.gpus == 1 and not riser:
                    out.singles_on_x16 += 1
                rig = rigs[cmd.worker_id]
                curve = curves[(rig.model, rig.watts)]
                duration, watts = capped(curve, cmd.power_limit_watts, duration, rig.watts)
                end = now + duration
                heappush(finishes, (end, cmd.job_id, cmd.worker_id, cmd.attempt, watts))
    _measure(out, core, trace, fleet)
    out.replay_s = time.perf_counter() - started
    out.replay_cpu_s = time.process_time() - cpu
    return out, core


def _measure(out: Outcome, core: BrokerCore, trace: Trace, fleet: Fleet) -> None:
    busy = 0.0
    last = trace.jobs[0].submit_s if trace.jobs else 0.0
    queue: list[float] = []
    for tj in trace.jobs:
        job = core.jobs[tj.job_id]
        attempt = job.current
        if attempt is None or attempt.end_time is None or job.state != "SUCCEEDED":
            continue
        out.finished += 1
        out.jct_s.append(attempt.end_time - tj.submit_s)
        out.duration_s.append(tj.duration_s)
        queue.append((job.attempts[0].start_time or 0.0) - tj.submit_s)
        busy += tj.duration_s * tj.gpus
        last = max(last, attempt.end_time)
        for ev in job.sla_events:
            if ev.kind == SlaKind.START_DEADLINE_MISSED:
                out.sla_breaches += 1
                out.sla_credits_usd += ev.credit_micros / 1e6
    span = last - trace.jobs[0].submit_s if trace.jobs else 0.0
    out.utilisation = busy / (fleet.gpus * span) if span > 0 else 0.0
    if out.jct_s:
        out.mean_jct_s = sum(out.jct_s) / len(out.jct_s)
        out.p50_jct_s = _pct(out.jct_s, 0.50)
        out.p99_jct_s = _pct(out.jct_s, 0.99)
        out.max_jct_s = max(out.jct_s)
        out.mean_queue_s = sum(queue) / len(queue)
        out.p99_queue_s = _pct(queue, 0.99)
        out.max_queue_s = max(queue)
    rows = earnings(core, group_by="farm")
    revenue = sum(r.revenue_micros for r in rows)
    joules = sum(r.energy_joules for r in rows)
    mining = sum(r.mining_usd_per_kwh * r.energy_joules for r in rows)  # energy-weighted
    out.revenue_usd = revenue / 1e6
    out.kwh = joules / 3_600_000
    out.kwh_saved = sum(r.energy_saved_joules for r in rows) / 3_600_000
    out.gpu_hours = sum(r.gpu_milliseconds for r in rows) / 3_600_000
    out.revenue_usd_per_kwh = revenue / 1e6 / out.kwh if joules else 0.0
    out.mining_usd_per_kwh = mining / joules if joules else 0.0
    out.ledger_problems = ledger_problems(core.ledger, charges_of(core.jobs.values()))
