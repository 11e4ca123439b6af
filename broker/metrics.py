"""Every metric the broker exports, in one module (STYLE.md 8).

Two kinds of series live here:

* **State** (jobs, workers and GPUs by state, the oldest pending job, and what
  can be derived from state: energy, revenue and mining alternative by farm,
  SLA events and credits, the ledger's balance) is read at scrape time by
  :class:`FleetCollector`: live work from ``BrokerCore``, what grows with history
  (finished jobs, settled energy, SLA events, the ledger) from running totals that
  start from the store's SQL aggregates and follow the core's commands
  (``broker.metrics_tally``), so a scrape never walks history.
* **Events** (submissions, completions, requeues, placements, queue wait,
  scheduling pass duration, lease expirations, RPCs) are counters
  and histograms fed by the shell: :meth:`BrokerMetrics.observe` sees every
  event ``BrokerService.apply`` hands to the core and the commands it caused,
  and :class:`RpcMetricsInterceptor` sees every RPC.

The registry is injected (tests read values with ``registry.get_sample_value``).
Names follow the Prometheus naming guide: ``rigshift_`` prefix, base units,
``_total`` on counters. Labels are bounded — farm, gpu_model, state, tier,
method, code, kind — never a job, attempt or worker id. ``docs/metrics.md``
lists every series.

``broker.metrics_http.MetricsServer`` serves the registry on ``/metrics`` and
:func:`sd_targets` on ``/sd`` (Prometheus HTTP service discovery of the agents'
exporters).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.core import BrokerCore, Job, Worker
from broker.earnings import mining_usd_per_kwh
from broker.events import (
    Assign,
    Command,
    Event,
    SchedulePass,
    Tick,
    Transition,
    WorkerRegistered,
    WorkerTransition,
)
from broker.metrics_rpc import RpcMetricsInterceptor
from broker.metrics_tally import HistoryTotals, Tally
from broker.model import TERMINAL_JOB_STATES, JobState, WorkerState
from rigshift.scoring import Verification

__all__ = [
    "ALLOWED_LABELS",
    "SLA_EVENT_KINDS",
    "TIERS",
    "BrokerMetrics",
    "FarmNames",
    "FleetCollector",
    "RpcMetricsInterceptor",
    "default_registry",
    "sd_targets",
]

log = logging.getLogger("rigshift.broker.metrics")

TIERS = ("guaranteed", "spot")
"""SLA tiers (``JobSpec.tier``, lower case); each is exported even at 0."""
SLA_EVENT_KINDS = (
    "start_deadline_missed",
    "interruption",
    "lost_work",
    "heartbeat_gap",
    "curtailed",
)
"""Kinds of SLA events (``broker.model.SlaKind``, lower case); each is exported even at 0."""
ALLOWED_LABELS = frozenset({"farm", "gpu_model", "state", "tier", "method", "code", "kind", "le"})
"""Every label a ``rigshift_`` series of the broker may carry (all of them bounded)."""
GPU_STATES = ("allocated", "free", "unavailable", "quarantined")
"""quarantined: taken out by its agent (whatever else holds); allocated: held by an attempt;
free: idle on an ONLINE worker; unavailable: idle elsewhere."""

QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
PASS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 300, 3600)

MICROS_PER_USD = 1_000_000


def default_registry() -> CollectorRegistry:
    """A fresh registry with the standard process, platform and GC collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def tier_of(job: Job) -> str:
    """The job's tier label: ``guaranteed`` unless its spec says otherwise (bounded to TIERS)."""
    tier: Any = getattr(job.spec, "tier", "guaranteed")
    if isinstance(tier, Enum):
        tier = tier.name
    name = str(tier).lower().removeprefix("tier_")
    return name if name in TIERS else "guaranteed"


def _state_label(state: Enum) -> str:
    return str(state.value).lower()


def dominant_model(worker: Worker) -> str:
    """The GPU model most of the worker's GPUs have (ties: alphabetical)."""
    return most_common_model(g.info.model for g in worker.gpus.values())


def most_common_model(models: Iterable[str]) -> str:
    """The most frequent of ``models`` (ties: alphabetical); empty for none."""
    counts = collections.Counter(models)
    if not counts:
        return ""
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


class FarmNames:
    """Farm id -> display name (the ``farm`` label), looked up at most once a minute per farm.

    A renamed farm gets its new label within ``ttl_s``; an unknown farm is
    labelled by its id.
    """

    def __init__(
        self,
        lookup: Callable[[str], str],
        *,
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._clock = clock
        self._names: dict[str, tuple[str, float]] = {}

    def __call__(self, farm_id: str) -> str:
        now = self._clock()
        cached = self._names.get(farm_id)
        if cached is not None and now - cached[1] < self._ttl_s:
            return cached[0]
        try:
            name = self._lookup(farm_id) or farm_id
        except Exception:
            return cached[0] if cached is not None else farm_id
        self._names[farm_id] = (name, now)
        return name


_FLEET_FAMILIES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("rigshift_jobs", "gauge", ("state", "tier"), "Jobs by state and tier."),
    (
        "rigshift_job_queue_oldest_wait_seconds",
        "gauge",
        ("tier",),
        "How long the oldest PENDING job has been waiting (0 when none is).",
    ),
    ("rigshift_workers", "gauge", ("farm", "state"), "Workers by farm and state."),
    (
        "rigshift_gpus",
        "gauge",
        ("farm", "gpu_model", "state"),
        "GPUs by farm, model and state (allocated, free, unavailable, quarantined).",
    ),
    (
        "rigshift_gpus_unverified",
        "gauge",
        ("farm", "gpu_model"),
        "GPUs of ONLINE and DRAINING workers that are not VERIFIED (PENDING or UNVERIFIED): "
        "placed only for jobs that accept unverified GPUs.",
    ),
    (
        "rigshift_farm_gpu_power_limit_watts",
        "gauge",
        ("farm",),
        "Sum of the power limits of the GPUs on a farm's ONLINE and DRAINING workers.",
    ),
    (
        "rigshift_farm_energy_joules",
        "counter",
        ("farm",),
        "Energy agents metered for settled AI attempts on a farm's GPUs.",
    ),
    (
        "rigshift_farm_revenue_usd",
        "counter",
        ("farm",),
        "What AI work paid the farm: the payout legs of the ledger.",
    ),
    (
        "rigshift_farm_mining_usd_per_kwh",
        "gauge",
        ("farm",),
        "What mining would have paid per kWh for the energy in rigshift_farm_energy_joules "
        "(energy-weighted by GPU model; 0 when not set).",
    ),
    (
        "rigshift_ledger_imbalance_micros",
        "gauge",
        (),
        "Sum of all ledger entries in micro-dollars; must be 0.",
    ),
    ("rigshift_sla_events", "counter", ("kind",), "SLA events by kind."),
    (
        "rigshift_curtailed_attempts",
        "counter",
        ("farm", "tier"),
        "Attempts a farm's curtailment window stopped (checkpointed and requeued), by tier.",
    ),
    (
        "rigshift_farm_curtailed",
        "gauge",
        ("farm",),
        "1 while one of the farm's curtailment windows is on, else 0.",
    ),
    (
        "rigshift_sla_credits_usd",
        "counter",
        ("kind",),
        "SLA credits granted to clients, by the kind of event that caused them.",
    ),
)


def _family(name: str, kind: str, labels: tuple[str, ...], doc: str) -> Metric:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(name, doc, labels=list(labels))


class FleetCollector(Collector):
    """Gauges and state-derived counters, computed from the core at scrape time."""

    def __init__(
        self,
        core: BrokerCore,
        farm_name: Callable[[str], str],
        clock: Callable[[], float] = time.time,
        history: HistoryTotals | None = None,
        figures: str | None = None,
    ) -> None:
        self.core = core
        self.farm_name = farm_name
        self.clock = clock
        # what grows with history (broker.metrics_tally)
        self.tally = Tally(core, history, figures)
        self._ledger_seen = 0
        self._ledger_sum = 0
        self._payouts: dict[str, int] = {}

    def describe(self) -> Iterable[Metric]:
        return [_family(*f) for f in _FLEET_FAMILIES]

    def collect(self) -> Iterator[Metric]:
        samples = self.samples()
        for spec in _FLEET_FAMILIES:
            family = _family(*spec)
            for labels, value in sorted(samples[spec[0]].items()):
                family.add_metric(list(labels), value)  # type: ignore[attr-defined]
            yield family

    def samples(self) -> dict[str, dict[tuple[str, ...], float]]:
        """Family name -> label values -> value, read from the core now."""
        out: dict[str, dict[tuple[str, ...], float]] = {f[0]: {} for f in _FLEET_FAMILIES}
        farms = {w.farm_id for w in self.core.workers.values()} | set(self.core.farms)
        for farm_id in farms:
            farm = (self.farm_name(farm_id),)
            out["rigshift_farm_gpu_power_limit_watts"][farm] = 0
            out["rigshift_farm_energy_joules"][farm] = 0
            out["rigshift_farm_revenue_usd"][farm] = 0.0
            for ws in WorkerState:
                out["rigshift_workers"][(*farm, _state_label(ws))] = 0
        self._jobs(out)
        self._fleet(out)
        self._ledger(out)
        return out

    def _jobs(self, out: dict[str, dict[tuple[str, ...], float]]) -> None:
        """Live jobs from the core; what grows with history from the tally (the store's
        totals at start, then the core's commands): a scrape walks no finished job."""
        now, core, tally = self.clock(), self.core, self.tally
        jobs = out["rigshift_jobs"]
        oldest = out["rigshift_job_queue_oldest_wait_seconds"]
        sla, credits = out["rigshift_sla_events"], out["rigshift_sla_credits_usd"]
        for tier in TIERS:
            oldest[(tier,)] = 0.0
            for s in JobState:
                jobs[(_state_label(s), tier)] = 0
        for kind in SLA_EVENT_KINDS:
            sla[(kind,)] = credits[(kind,)] = 0
        tally.prune()
        for job in core.jobs.values():
            if job.state in TERMINAL_JOB_STATES:
                continue  # counted by the tally (the core may have forgotten it)
            tier = tier_of(job)
            jobs[(_state_label(job.state), tier)] += 1
            if job.state == JobState.PENDING and job.history:
                waited = max(0.0, now - job.history[-1].time)
                oldest[(tier,)] = max(oldest[(tier,)], waited)
        for key, n in tally.finished.items():
            if key in jobs:
                jobs[key] += n
        for kind, n in tally.sla.items():
            if (kind,) in sla:
                sla[(kind,)] += n
                credits[(kind,)] += tally.credits.get(kind, 0) / MICROS_PER_USD
        curtailed = out["rigshift_curtailed_attempts"]
        for (farm_id, tier), n in tally.curtailed.items():
            ckey = (self.farm_name(farm_id), tier)
            curtailed[ckey] = curtailed.get(ckey, 0) + n
        farms = {w.farm_id for w in core.workers.values()} | set(core.farms)
        for farm_id in farms:
            farm = (self.farm_name(farm_id),)
            on = core.active_curtailment(farm_id, now) is not None
            out["rigshift_farm_curtailed"][farm] = 1 if on else 0
            for t in TIERS:
                curtailed.setdefault((*farm, t), 0)
            out["rigshift_farm_energy_joules"][farm] += tally.energy.get(farm_id, 0)
            # The one definition of the figure, the one GetEarnings reports (broker.earnings).
            models = tally.models.get(farm_id, {})
            mining = mining_usd_per_kwh(core.farms.get(farm_id), models)
            out["rigshift_farm_mining_usd_per_kwh"][farm] = mining

    def _fleet(self, out: dict[str, dict[tuple[str, ...], float]]) -> None:
        workers, gpus = out["rigshift_workers"], out["rigshift_gpus"]
        unverified = out["rigshift_gpus_unverified"]
        power = out["rigshift_farm_gpu_power_limit_watts"]
        for w in self.core.workers.values():
            farm = self.farm_name(w.farm_id)
            workers[(farm, _state_label(w.state))] += 1
            for gpu in w.gpus.values():
                model = gpu.info.model
                if (farm, model, "free") not in gpus:
                    for gs in GPU_STATES:
                        gpus[(farm, model, gs)] = 0
                    unverified[(farm, model)] = 0
                if gpu.quarantine_reason:
                    state = "quarantined"
                elif gpu.holder is not None:
                    state = "allocated"
                elif w.state == WorkerState.ONLINE:
                    state = "free"
                else:
                    state = "unavailable"
                gpus[(farm, model, state)] += 1
                if w.state != WorkerState.OFFLINE:
                    power[(farm,)] += gpu.info.power_limit_watts
                    if gpu.verdict.verification != Verification.VERIFIED:
                        unverified[(farm, model)] += 1

    def _ledger(self, out: dict[str, dict[tuple[str, ...], float]]) -> None:
        """Imbalance and farm payouts: the tally's (the store's totals, then the legs the
        core posted) for a core without a ledger; else tallied over the core's entries
        added since the last scrape."""
        if not self.core.keep_ledger:
            out["rigshift_ledger_imbalance_micros"][()] = self.tally.ledger_sum
            for farm_id, micros in self.tally.payouts.items():
                farm = (self.farm_name(farm_id),)
                out["rigshift_farm_revenue_usd"][farm] = micros / MICROS_PER_USD
            return
        ledger = self.core.ledger
        if len(ledger) < self._ledger_seen:  # replaced (a reload): tally again
            self._ledger_seen, self._ledger_sum, self._payouts = 0, 0, {}
        for entry in ledger[self._ledger_seen :]:
            self._ledger_sum += entry.amount_micros
            if entry.kind == "payout" and entry.account.startswith("farm:"):
                farm_id = entry.account.removeprefix("farm:")
                self._payouts[farm_id] = self._payouts.get(farm_id, 0) + entry.amount_micros
        self._ledger_seen = len(ledger)
        out["rigshift_ledger_imbalance_micros"][()] = self._ledger_sum
        for farm_id, micros in self._payouts.items():
            out["rigshift_farm_revenue_usd"][(self.farm_name(farm_id),)] = micros / MICROS_PER_USD


class BrokerMetrics:
    """The broker's counters and histograms, plus the fleet collector, in one registry."""

    def __init__(
        self,
        core: BrokerCore,
        registry: CollectorRegistry,
        *,
        farm_name: Callable[[str], str] = str,
        clock: Callable[[], float] = time.time,
        history: HistoryTotals | None = None,
        figures: str | None = None,
    ) -> None:
        """``figures``: the totals a cleanly stopped broker left (``Tally.figures``), else
        ``history``: the store's totals to start from (``Store.history_totals``); neither
        counts what the core holds (a pure core)."""
        self.core = core
        self.registry = registry
        self.farm_name = farm_name
        r = registry
        self.submitted = Counter("rigshift_jobs_submitted", "Jobs accepted.", ["tier"], registry=r)
        self.completed = Counter(
            "rigshift_jobs_completed",
            "Jobs that reached a final state, by that state.",
            ["state", "tier"],
            registry=r,
        )
        self.requeued = Counter(
            "rigshift_jobs_requeued",
            "Jobs sent back to PENDING after their attempt was lost or preempted.",
            ["tier"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "rigshift_job_queue_wait_seconds",
            "Time a job spent PENDING before it was SCHEDULED (each placement).",
            ["tier"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.placements = Counter(
            "rigshift_placements",
            "Attempts placed on a worker, by GPU model.",
            ["gpu_model", "tier"],
            registry=r,
        )
        self.schedule_pass = Histogram(
            "rigshift_scheduling_pass_duration_seconds",
            "Time one scheduling pass took in the core.",
            buckets=PASS_BUCKETS,
            registry=r,
        )
        self.lease_expirations = Counter(
            "rigshift_worker_lease_expirations",
            "Workers that went OFFLINE because their heartbeats stopped.",
            ["farm"],
            registry=r,
        )
        self.rpc_requests = Counter(
            "rigshift_grpc_requests",
            "RPCs handled, by full method name and status code.",
            ["method", "code"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            "rigshift_grpc_request_duration_seconds",
            "RPC latency (streams: until the stream ended), by method and status code.",
            ["method", "code"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        for tier in TIERS:
            self.submitted.labels(tier)
            self.requeued.labels(tier)
            self.queue_wait.labels(tier)
            for s in TERMINAL_JOB_STATES:
                self.completed.labels(_state_label(s), tier)
        self.fleet = FleetCollector(core, farm_name, clock, history, figures)
        registry.register(self.fleet)

    def observe(self, event: Event, cmds: list[Command], elapsed_s: float) -> None:
        """Count what one event handled by the core did (called by ``BrokerService.apply``).

        Never raises: a bug here must not undo a decision the core already made.
        """
        try:
            self._observe(event, cmds, elapsed_s)
        except Exception:
            log.exception("metrics: cannot observe %s", type(event).__name__)

    def _observe(self, event: Event, cmds: list[Command], elapsed_s: float) -> None:
        self.fleet.tally.observe(cmds)
        if isinstance(event, SchedulePass):
            self.schedule_pass.observe(elapsed_s)
        elif isinstance(event, WorkerRegistered):
            self.lease_expirations.labels(self.farm_name(event.farm_id))  # the series exists at 0
        for cmd in cmds:
            if isinstance(cmd, Transition):
                self._transition(event, cmd)
            elif isinstance(cmd, Assign):
                worker = self.core.workers[cmd.worker_id]
                gpu = worker.gpus.get(cmd.gpu_indices[0]) if cmd.gpu_indices else None
                model = gpu.info.model if gpu is not None else ""
                self.placements.labels(model, tier_of(self.core.jobs[cmd.job_id])).inc()
            elif (
                isinstance(cmd, WorkerTransition)
                and isinstance(event, Tick)
                and cmd.to_state == WorkerState.OFFLINE
            ):
                farm_id = self.core.workers[cmd.worker_id].farm_id
                self.lease_expirations.labels(self.farm_name(farm_id)).inc()

    def _transition(self, event: Event, cmd: Transition) -> None:
        job = self.core.jobs[cmd.job_id]
        tier = tier_of(job)
        if cmd.from_state is None:
            self.submitted.labels(tier).inc()
        elif cmd.to_state in TERMINAL_JOB_STATES:
            self.completed.labels(_state_label(cmd.to_state), tier).inc()
        elif cmd.to_state == JobState.PENDING:
            self.requeued.labels(tier).inc()
        elif cmd.to_state == JobState.SCHEDULED:
            since = _pending_since(job)
            if since is not None:
                self.queue_wait.labels(tier).observe(max(0.0, event.now - since))

    def interceptor(self) -> RpcMetricsInterceptor:
        """A gRPC server interceptor feeding the RPC counters."""
        return RpcMetricsInterceptor(self.rpc_requests, self.rpc_duration)

    def sd_targets(self) -> list[dict[str, Any]]:
        """Prometheus HTTP SD target groups of the agents' exporters."""
        return sd_targets(self.core, self.farm_name)


def _pending_since(job: Job) -> float | None:
    """When the job last entered PENDING before its latest SCHEDULED."""
    for i in range(len(job.history) - 1, 0, -1):
        if job.history[i].to_state == JobState.SCHEDULED:
            prev = job.history[i - 1]
            return prev.time if prev.to_state == JobState.PENDING else None
    return None


def sd_targets(core: BrokerCore, farm_name: Callable[[str], str]) -> list[dict[str, Any]]:
    """One target group per ONLINE/DRAINING worker that reported a metrics address."""
    groups = []
    for w in sorted(core.workers.values(), key=lambda w: w.worker_id):
        if w.state == WorkerState.OFFLINE or not w.metrics_address:
            continue
        labels = {"farm": farm_name(w.farm_id), "gpu_model": dominant_model(w)}
        groups.append({"targets": [w.metrics_address], "labels": labels})
    return groups
