"""What the broker's metrics count over history, kept as running totals (docs/scale.md).

The broker holds no ledger and forgets finished jobs, so a scrape cannot walk them. The
figures that grow with history -- finished jobs by state and tier, the energy of settled
attempts by farm and GPU model, SLA events and credits, attempts stopped by curtailment,
the ledger's sum and each farm's payouts -- start from the store's aggregates
(:class:`HistoryTotals`, ``broker.store.ledger_sql.history_totals``) or, for a pure core,
from the core itself, and then follow the core's commands (:meth:`Tally.observe`): each
job a ``Persist`` names is compared with what was already counted of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from broker.core import BrokerCore, Job
from broker.earnings import joules_by_model
from broker.economics import LedgerEntry
from broker.events import Command, Persist, PostLedger
from broker.model import TERMINAL_JOB_STATES, SlaKind

__all__ = ["EnergyGroup", "HistoryTotals", "Tally"]


@dataclass(frozen=True, slots=True)
class EnergyGroup:
    """Settled attempts with energy on one worker's same GPUs: their joules in all, and per
    GPU position the joules an even split of each attempt gives it (remainders to the
    first GPUs, as ``broker.earnings`` splits them)."""

    worker_id: str
    gpu_indices: tuple[int, ...]
    joules: int
    per_gpu: tuple[int, ...]


@dataclass(slots=True)
class HistoryTotals:
    """The store's aggregates the metrics start from. States, tiers and kinds are the
    enums' values as the tables hold them (``SUCCEEDED``, ``SPOT``, ``LOST_WORK``)."""

    imbalance_micros: int = 0
    payouts_by_farm: dict[str, int] = field(default_factory=dict)
    finished_jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (state, tier)
    sla: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (n, credit)
    curtailed: dict[tuple[str, str], int] = field(default_factory=dict)  # (worker_id, tier)
    energy: list[EnergyGroup] = field(default_factory=list)


@dataclass(slots=True)
class _Counted:
    """What is already counted of one job the core holds."""

    settled: set[int] = field(default_factory=set)
    sla_events: int = 0
    finished: bool = False


def _tier(value: object) -> str:
    name = str(getattr(value, "value", value)).lower().removeprefix("tier_")
    return name if name in ("guaranteed", "spot") else "guaranteed"


class Tally:
    """Running totals over history (see the module docstring); farms by id, labels lower
    case (``succeeded``, ``spot``, ``lost_work``)."""

    def __init__(
        self,
        core: BrokerCore,
        totals: HistoryTotals | None = None,
        figures: str | None = None,
    ) -> None:
        """Start from ``figures`` (what :meth:`figures` of a broker that stopped cleanly
        left), else from the store's ``totals``, else (a pure core) from the core."""
        self.core = core
        self.finished: dict[tuple[str, str], int] = {}
        self.energy: dict[str, int] = {}  # farm id -> joules
        self.models: dict[str, dict[str, int]] = {}  # farm id -> GPU model -> joules
        self.sla: dict[str, int] = {}
        self.credits: dict[str, int] = {}  # kind -> micro-dollars
        self.curtailed: dict[tuple[str, str], int] = {}  # (farm id, tier)
        self.ledger_sum = 0
        self.payouts: dict[str, int] = {}
        self._counted: dict[str, _Counted] = {}
        if figures is not None:
            self._resume(json.loads(figures))
        elif totals is None:  # a pure core: count what it holds
            self.post(core.ledger)
            for job in core.jobs.values():
                self.count(job)
        else:
            self._start(totals)

    def figures(self) -> str:
        """The running totals as JSON, for the next broker (``Store.leave_metric_snapshot``).
        They are farm-keyed already: the next broker does not need the workers of history."""
        return json.dumps(
            {
                "finished": [[*k, n] for k, n in sorted(self.finished.items())],
                "curtailed": [[*k, n] for k, n in sorted(self.curtailed.items())],
                "energy": self.energy,
                "models": self.models,
                "sla": self.sla,
                "credits": self.credits,
                "ledger_sum": self.ledger_sum,
                "payouts": self.payouts,
            },
            sort_keys=True,
        )

    def _resume(self, f: dict[str, Any]) -> None:
        self.finished = {(state, tier): int(n) for state, tier, n in f["finished"]}
        self.curtailed = {(farm, tier): int(n) for farm, tier, n in f["curtailed"]}
        self.energy = {k: int(v) for k, v in f["energy"].items()}
        self.models = {k: {m: int(j) for m, j in v.items()} for k, v in f["models"].items()}
        self.sla = {k: int(v) for k, v in f["sla"].items()}
        self.credits = {k: int(v) for k, v in f["credits"].items()}
        self.ledger_sum = int(f["ledger_sum"])
        self.payouts = {k: int(v) for k, v in f["payouts"].items()}
        self._count_held_as_is()

    def _start(self, t: HistoryTotals) -> None:
        self.ledger_sum = t.imbalance_micros
        self.payouts = dict(t.payouts_by_farm)
        for (state, tier), n in t.finished_jobs.items():
            key = (state.lower(), _tier(tier))
            self.finished[key] = self.finished.get(key, 0) + n
        for kind, (n, credit) in t.sla.items():
            self.sla[kind.lower()] = self.sla.get(kind.lower(), 0) + n
            self.credits[kind.lower()] = self.credits.get(kind.lower(), 0) + credit
        for (worker_id, tier), n in t.curtailed.items():
            worker = self.core.workers.get(worker_id)
            if worker is not None:
                key = (worker.farm_id, _tier(tier))
                self.curtailed[key] = self.curtailed.get(key, 0) + n
        for g in t.energy:
            worker = self.core.workers.get(g.worker_id)
            if worker is None:
                continue
            self.energy[worker.farm_id] = self.energy.get(worker.farm_id, 0) + g.joules
            by_model = self.models.setdefault(worker.farm_id, {})
            for index, joules in zip(g.gpu_indices, g.per_gpu, strict=True):
                gpu = worker.gpus.get(index)
                model = gpu.info.model if gpu else "?"
                by_model[model] = by_model.get(model, 0) + joules
        self._count_held_as_is()

    def _count_held_as_is(self) -> None:
        # The jobs the core holds are in the store's totals already: counted as they are.
        for job in self.core.jobs.values():
            self._counted[job.job_id] = _Counted(
                {a.number for a in job.attempts if a.settled},
                len(job.sla_events),
                job.state in TERMINAL_JOB_STATES,
            )

    def observe(self, cmds: Iterable[Command]) -> None:
        """Count what these commands of the core changed: posted legs, and the jobs that a
        ``Persist`` names (settled attempts, SLA events, a final state)."""
        for cmd in cmds:
            if isinstance(cmd, PostLedger):
                self.post(cmd.entries)
            elif isinstance(cmd, Persist):
                for job_id in cmd.job_ids:
                    job = self.core.jobs.get(job_id)
                    if job is not None:
                        self.count(job)

    def post(self, entries: Iterable[LedgerEntry]) -> None:
        """Add ledger legs to the sum and the farms' payouts."""
        for e in entries:
            self.ledger_sum += e.amount_micros
            if e.kind == "payout" and e.account.startswith("farm:"):
                farm_id = e.account.removeprefix("farm:")
                self.payouts[farm_id] = self.payouts.get(farm_id, 0) + e.amount_micros

    def count(self, job: Job) -> None:
        """Count what is new of this job since it was last counted."""
        seen = self._counted.setdefault(job.job_id, _Counted())
        tier = _tier(getattr(job.spec, "tier", "guaranteed"))
        for a in job.attempts:
            if not a.settled or a.number in seen.settled:
                continue
            seen.settled.add(a.number)
            worker = self.core.workers.get(a.worker_id)
            if a.energy_joules and worker is not None:
                farm = worker.farm_id
                self.energy[farm] = self.energy.get(farm, 0) + a.energy_joules
                by_model = self.models.setdefault(farm, {})
                for model, joules in joules_by_model(worker, a).items():
                    by_model[model] = by_model.get(model, 0) + joules
        for event in job.sla_events[seen.sla_events :]:
            kind = str(event.kind.value).lower()
            self.sla[kind] = self.sla.get(kind, 0) + 1
            self.credits[kind] = self.credits.get(kind, 0) + event.credit_micros
            if event.kind == SlaKind.CURTAILED and 1 <= event.attempt <= len(job.attempts):
                stopped = self.core.workers.get(job.attempts[event.attempt - 1].worker_id)
                if stopped is not None:
                    key = (stopped.farm_id, tier)
                    self.curtailed[key] = self.curtailed.get(key, 0) + 1
        seen.sla_events = len(job.sla_events)
        if job.state in TERMINAL_JOB_STATES and not seen.finished:
            seen.finished = True
            key = (str(job.state.value).lower(), tier)
            self.finished[key] = self.finished.get(key, 0) + 1

    def prune(self) -> None:
        """Forget what was counted of jobs the core no longer holds (they cannot change)."""
        if len(self._counted) > len(self.core.jobs):
            for job_id in [j for j in self._counted if j not in self.core.jobs]:
                del self._counted[job_id]
