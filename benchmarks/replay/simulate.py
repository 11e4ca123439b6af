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
from dataclasses import dataclass, field, replace
from heapq import heappop, heappush
from typing import Any

from broker.core import BrokerCore
from broker.earnings import earnings
from broker.events import (
    Assign,
    AttemptFinished,
    AttemptProgress,
    AttemptStarted,
    Cancel,
    Command,
    CurtailmentScheduled,
    FarmConfigured,
    JobSubmitted,
    SchedulePass,
    Tick,
    WorkerRegistered,
)
from broker.ledger import charges_of, ledger_problems
from broker.model import GpuInfo, JobSpec, SlaKind, Tier
from broker.policy import FIFO, SHORT_FIRST
from broker.windows import Window
from rigshift.scoring import Measurement

from .curtail import CurtailSpec, windows_for
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
    curtail: str = ""  # the --curtail schedules, comma-separated ("": none)
    spot_percent: int = 0
    curtail_windows: int = 0  # windows that started
    curtailed_gpu_hours: float = 0.0  # the farms' GPU time inside windows
    kwh_not_drawn: float = 0.0  # broker.curtailed: average AI draw minus idle, over it
    demand_response_usd: float = 0.0
    interrupted_spot: int = 0  # attempts a window stopped
    interrupted_guaranteed: int = 0
    preempted: int = 0  # spot attempts the scheduler preempted for guaranteed work
    curtailed_jobs: int = 0  # jobs with a CURTAILED SLA event
    curtail_credits_usd: float = 0.0  # paid by the farms for guaranteed work they stopped
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
    curtail: Sequence[CurtailSpec] = (),
    spot_percent: int = 0,
    demand_response_micros_per_mwh: int = 0,
) -> tuple[Outcome, BrokerCore]:
    """Run the whole trace under one policy; returns the figures and the final core.

    ``scoring`` is one of :data:`SCORINGS`; ``gang_slowdown`` how much longer a gang runs
    on a riser rig (:data:`RISER_MBPS`) than its trace duration (1: links do not matter).
    Every job accepts unverified GPUs: the simulated rigs report no self-test (their
    link's bandwidth at most), and verification is not what the replay measures.
    ``power``: the farms' power policy (``replay.power``; every GPU has the simulated
    curve and a settable limit). ``curtail``: the farms' curtailment windows
    (``replay.curtail``), fed to the core as ``CurtailmentScheduled`` a day ahead and
    started and ended by a ``Tick`` at their start and end; an attempt a window (or a
    preemption) stops ends at once, its job checkpointed on SIGTERM (no work lost), and
    its next attempt runs the work left. ``spot_percent``: that share of the jobs, spread
    evenly, is submitted as spot. ``demand_response_micros_per_mwh``: every farm's
    demand-response price."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r} (known: {', '.join(SCORINGS)})")
    started, cpu = time.perf_counter(), time.process_time()
    estimator = DurationEstimator()
    order = SHORT_FIRST if policy.startswith("short-first") else FIFO
    # The lean view shows a pass only what fits the fleet's index, which leaves out the
    # farms with a window coming (the core places on those itself, for the jobs a pass
    # left): with windows, every pass sees the whole queue.
    lean = lean and not curtail
    view = LeanView(head_of_line=policy == "fifo", lean=lean, topology=scoring == "topology")
    # No heartbeats in virtual time: leases never expire (the Tick that starts and ends
    # curtailment windows would otherwise take every rig offline).
    core = BrokerCore(queue_policy=order, view=view, lease_ttl_s=math.inf)
    jobs = trace.jobs
    t0 = jobs[0].submit_s if jobs else 0.0
    for terms in fleet.farms:
        terms = replace(
            power.terms(terms), demand_response_micros_per_mwh=demand_response_micros_per_mwh
        )
        core.handle(FarmConfigured(t0, terms))
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
    specs: dict[tuple[int, int, bool], JobSpec] = {}  # (GPUs, declared limit, spot) -> spec
    spot = _spot_jobs(jobs, spot_percent)
    # Heap of (end, job_id, worker_id, attempt); an entry whose attempt is no longer in
    # ``running`` was stopped by a window or a preemption and is skipped.
    finishes: list[tuple[float, str, str, int]] = []
    running: dict[tuple[str, int], _Run] = {}
    remaining = {j.job_id: j.duration_s for j in jobs}  # uncapped work left, seconds
    controls = _controls(curtail, fleet, jobs)
    out = Outcome(
        policy,
        scoring,
        power.label,
        gang_slowdown,
        rows=trace.rows,
        skipped=trace.too_wide,
        invalid=trace.invalid,
        curtail=",".join(c.label for c in curtail),
        spot_percent=spot_percent,
    )
    i, n = 0, len(jobs)
    handle = core.handle
    now = t0

    def stop(cmd: Cancel, at: float, by_window: bool) -> None:
        """The agent's side of a Cancel: SIGTERM, the job checkpoints (no work lost), the
        attempt ends; the job's remaining work shrinks by what this attempt did."""
        run = running.pop((cmd.job_id, cmd.attempt), None)
        if run is None:
            return
        done = (at - run.start) / run.stretch
        remaining[cmd.job_id] = max(0.0, remaining[cmd.job_id] - done)
        if not by_window:
            out.preempted += 1
        elif cmd.job_id in spot:
            out.interrupted_spot += 1
        else:
            out.interrupted_guaranteed += 1
        joules = round(run.watts * (at - run.start) * run.gpus)
        handle(
            AttemptFinished(at, cmd.worker_id, cmd.job_id, cmd.attempt, run.seq + 1, 143, joules)
        )

    def commands(cmds: list[Command], at: float) -> None:
        for cmd in cmds:
            if type(cmd) is Cancel:
                stop(cmd, at, True)

    while i < n or running or (controls and core.pending):
        now = max(
            now,
            min(
                jobs[i].submit_s if i < n else math.inf,
                finishes[0][0] if finishes else math.inf,
                controls[0][0] if controls else math.inf,
            ),
        )
        second = math.floor(now) + 1  # everything in this virtual second is one batch
        while finishes and finishes[0][0] < second:
            end, job_id, worker_id, attempt = heappop(finishes)
            run = running.pop((job_id, attempt), None)
            if run is None:
                continue  # stopped before its end
            tj = by_id[job_id]
            joules = round(run.watts * (end - run.start) * tj.gpus)
            handle(AttemptFinished(end, worker_id, job_id, attempt, run.seq + 1, 0, joules))
            estimator.observe(tj.owner, tj.gpus, tj.duration_s)
            now = max(now, end)
        while controls and controls[0][0] < second:
            at, _, kind, window = heappop(controls)
            at = now = max(at, now)
            if kind == "create":
                commands(handle(CurtailmentScheduled(at, window)), at)
                continue
            if kind == "start":
                # The agents' last progress reports: the energy of the attempts the window
                # is about to stop is metered before they end.
                for (job_id, attempt), run in running.items():
                    if rigs[run.worker_id].farm_id == window.farm_id:
                        joules = round(run.watts * (at - run.start) * run.gpus)
                        run.seq += 1
                        handle(AttemptProgress(at, run.worker_id, job_id, attempt, run.seq, joules))
            commands(handle(Tick(at)), at)
        while i < n and jobs[i].submit_s < second:
            tj = jobs[i]
            shape = (tj.gpus, declared_limit(policy, estimator, tj), tj.job_id in spot)
            spec = specs.get(shape)
            if spec is None:
                spec = specs[shape] = JobSpec(
                    ("trace",),
                    gpu_count=shape[0],
                    max_duration_seconds=shape[1],
                    allow_unverified=True,
                    tier=Tier.SPOT if shape[2] else Tier.GUARANTEED,
                )
            handle(JobSubmitted(tj.submit_s, tj.job_id, tj.owner, spec))
            now = max(now, tj.submit_s)
            i += 1
        # The view sees the fleet's index only; a farm with a window coming is in an index
        # of the core's own (``broker.curtailment``), which the core places on itself.
        side = core.pending and any(len(index) for index in core._side.values())
        if not (view.worth_a_pass() or side):
            continue
        out.schedule_passes += 1
        for cmd in handle(SchedulePass(now)):
            if type(cmd) is Cancel:
                stop(cmd, now, False)  # a spot attempt preempted for guaranteed work
            elif type(cmd) is Assign:
                tj = by_id[cmd.job_id]
                handle(AttemptStarted(now, cmd.worker_id, cmd.job_id, cmd.attempt, 1))
                rig = rigs[cmd.worker_id]
                riser = rig.link_mbps < RISER_MBPS
                work = remaining[cmd.job_id]
                duration = work
                if tj.gpus > 1 and riser:
                    duration *= gang_slowdown
                    out.gangs_on_risers += cmd.attempt == 1
                elif tj.gpus == 1 and not riser:
                    out.singles_on_x16 += cmd.attempt == 1
                curve = curves[(rig.model, rig.watts)]
                duration, watts = capped(curve, cmd.power_limit_watts, duration, rig.watts)
                stretch = duration / work if work > 0 else 1.0
                running[(cmd.job_id, cmd.attempt)] = _Run(
                    cmd.worker_id, now, stretch, watts, tj.gpus
                )
                heappush(finishes, (now + duration, cmd.job_id, cmd.worker_id, cmd.attempt))
    _measure(out, core, trace, fleet, now)
    out.replay_s = time.perf_counter() - started
    out.replay_cpu_s = time.process_time() - cpu
    return out, core


@dataclass(slots=True)
class _Run:
    """A running attempt: where, since when, how much longer than its work it runs
    (power cap, riser), at what draw per GPU."""

    worker_id: str
    start: float
    stretch: float
    watts: float
    gpus: int
    seq: int = 1  # the last report's sequence (AttemptStarted is 1)


def _spot_jobs(jobs: Sequence[TraceJob], percent: int) -> set[str]:
    """The jobs submitted as spot: ``percent`` of them, spread evenly (deterministic)."""
    return {j.job_id for k, j in enumerate(jobs) if (k + 1) * percent // 100 > k * percent // 100}


def _controls(
    curtail: Sequence[CurtailSpec], fleet: Fleet, jobs: Sequence[TraceJob]
) -> list[tuple[float, int, str, Window]]:
    """Heap of (time, order, create|start|end, window) for every window of the schedules
    from the first submit to the last submit plus the longest job (later ones are not
    delivered once the work is done)."""
    if not curtail or not jobs:
        return []
    last = jobs[-1].submit_s + max(j.duration_s for j in jobs)
    out: list[tuple[float, int, str, Window]] = []
    for created, w in windows_for(curtail, fleet, jobs[0].submit_s, last):
        out += [(created, len(out), "create", w)]
        out += [(w.start_time, len(out), "start", w), (w.end_time, len(out) + 1, "end", w)]
    out.sort(key=lambda c: (c[0], c[1]))
    return out


def _measure(out: Outcome, core: BrokerCore, trace: Trace, fleet: Fleet, now: float) -> None:
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
        # The first attempt that started (one preempted in the pass that bound it never did).
        first = next(a.start_time for a in job.attempts if a.start_time is not None)
        queue.append(first - tj.submit_s)
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
    # A window on when the work ran out counts to its end; later ones were never started.
    now = max([now] + [w.end_time for w in core.windows.values() if w.start_time <= now])
    rows = earnings(core, group_by="farm", now=now)
    revenue = sum(r.revenue_micros for r in rows)
    joules = sum(r.energy_joules for r in rows)
    mining = sum(r.mining_usd_per_kwh * r.energy_joules for r in rows)  # energy-weighted
    out.revenue_usd = revenue / 1e6
    out.kwh = joules / 3_600_000
    out.kwh_saved = sum(r.energy_saved_joules for r in rows) / 3_600_000
    out.gpu_hours = sum(r.gpu_milliseconds for r in rows) / 3_600_000
    out.revenue_usd_per_kwh = revenue / 1e6 / out.kwh if joules else 0.0
    out.mining_usd_per_kwh = mining / joules if joules else 0.0
    out.curtail_windows = sum(1 for w in core.windows.values() if w.start_time <= now)
    out.curtailed_gpu_hours = sum(r.curtailed.gpu_milliseconds for r in rows) / 3_600_000
    out.kwh_not_drawn = sum(r.curtailed.energy_joules for r in rows) / 3_600_000
    out.demand_response_usd = sum(r.curtailed.demand_response_micros for r in rows) / 1e6
    for job in core.jobs.values():
        events = [e for e in job.sla_events if e.kind == SlaKind.CURTAILED]
        out.curtailed_jobs += bool(events)
        out.curtail_credits_usd += sum(e.credit_micros for e in events) / 1e6
    out.ledger_problems = ledger_problems(core.ledger, charges_of(core.jobs.values()))
