"""The core's handling of GPU health and verification (part of ``BrokerCore``; ``docs/health.md``).

**Verification.** Each GPU's self-test figures (at registration, and a probation
re-test's in a health report) are judged by ``rigshift.scoring.judge`` against the
model the agent claims: ``Gpu.verdict`` (PENDING, VERIFIED or UNVERIFIED with the
reason, and the score). The claimed model alone never makes a GPU VERIFIED.

**Quarantine mirrors the agent.** The agent decides; the broker takes its word
(``GpuHealthReported``, the rig's whole health, idempotent). A GPU newly quarantined
loses the attempt holding it the way a lost lease does (``_lose_attempt``: requeued to
PENDING while attempts are left, resuming from the job's latest checkpoint elsewhere,
with the INTERRUPTION and LOST_WORK SLA events) and the agent is told to cancel that
attempt in case it still runs; a GPU the report no longer names as quarantined
returns to service. The scheduler's capacity leaves quarantined GPUs out
(``broker.queue``): no placements, no earnings.

**Power caps** (``docs/energy.md``). A GPU on a farm whose policy is EFFICIENT, with a
power curve and a limit its agent may set, runs AI work at :func:`ai_limit`
(``rigshift.power.choose_limit``); its verdict's score is the score at that limit
(the uncapped score x the curve's throughput ratio there), so the score clients see
and filter on is the one the GPU will run at. Verification is judged from the
uncapped figures (the card is what it is).

**Reinstating** (``ReinstateRequested``) changes nothing here: it sends the agent
``SendReinstate``; the GPU returns when the agent's re-test passes and it reports so.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from broker.economics import FarmTerms, PowerPolicy
from broker.errors import FailedPrecondition, FieldViolation, NotFound
from broker.events import (
    Cancel,
    Command,
    GpuHealth,
    GpuHealthReported,
    ReinstateRequested,
    SendReinstate,
)
from broker.model import GpuInfo, WorkerState
from broker.records import Attempt, Effects, Gpu, Job, Worker
from rigshift.power import choose_limit, ratio_at
from rigshift.scoring import Measurement, judge

__all__ = ["GpuHealthHandlers", "ai_limit", "apply_power_policy", "judged"]

QUARANTINED = "quarantined by its agent"
"""The reason shown when an agent quarantined a GPU without saying why."""


def judged(gpu: Gpu, measurement: Measurement | None) -> bool:
    """Keep ``measurement`` as the GPU's latest figures and judge it; True when the
    verdict changed (what the scheduler filters on)."""
    gpu.measurement = measurement
    verdict = judge(gpu.info.model, gpu.info.vram_mb, measurement)
    if gpu.ai_power_limit_watts:
        throughput, _ = ratio_at(gpu.info.power_curve, gpu.ai_power_limit_watts)
        verdict = replace(verdict, score=verdict.score * throughput // 1000)
    changed = verdict != gpu.verdict
    gpu.verdict = verdict
    return changed


def ai_limit(info: GpuInfo, terms: FarmTerms | None) -> int:
    """The power limit (W) a GPU runs AI work at under its farm's policy; 0 (its board
    limit) on MAX, without a curve, where its agent may not set the limit, or when the
    chosen limit is not below the highest limit measured (or the board limit)."""
    if terms is None or terms.power_policy != PowerPolicy.EFFICIENT:
        return 0
    if not info.power_limit_settable or not info.power_curve:
        return 0
    limit = choose_limit(info.power_curve, terms.max_slowdown_percent)
    top = max(p.limit_watts for p in info.power_curve)
    if limit <= 0 or limit >= top or (info.power_limit_watts and limit >= info.power_limit_watts):
        return 0
    return limit


def apply_power_policy(gpu: Gpu, terms: FarmTerms | None) -> bool:
    """Set the GPU's AI limit from its farm's terms and rescale its score; True when the
    limit changed."""
    limit = ai_limit(gpu.info, terms)
    if limit == gpu.ai_power_limit_watts:
        return False
    gpu.ai_power_limit_watts = limit
    judged(gpu, gpu.measurement)
    return True


def quarantine(gpu: Gpu, health: GpuHealth, now: float) -> bool:
    """Make ``gpu`` show what ``health`` says of its quarantine; True when that changed.

    A GPU already quarantined keeps the time it was first taken out, unless the agent
    states another.
    """
    before = (gpu.quarantine_reason, gpu.quarantined_at, gpu.reinstate_required)
    if health.quarantined:
        gpu.quarantine_reason = health.reason or gpu.quarantine_reason or QUARANTINED
        if health.since is not None:
            gpu.quarantined_at = health.since
        elif gpu.quarantined_at is None:
            gpu.quarantined_at = now
        gpu.reinstate_required = health.reinstate_required
    else:
        gpu.quarantine_reason, gpu.quarantined_at, gpu.reinstate_required = "", None, False
    return before != (gpu.quarantine_reason, gpu.quarantined_at, gpu.reinstate_required)


class GpuHealthHandlers:
    """``BrokerCore``'s GPU health handlers (a mixin: the state is the core's)."""

    if TYPE_CHECKING:
        jobs: dict[str, Job]
        _out: Effects

        def worker(self, worker_id: str) -> Worker: ...

        def _worker_changed(self, worker_id: str) -> None: ...

        def _lose_attempt(
            self, job: Job, attempt: Attempt, now: float, why: str
        ) -> list[Command]: ...

    def _gpu_health(self, ev: GpuHealthReported) -> list[Command]:
        worker = self.worker(ev.worker_id)
        reported = {h.index: h for h in ev.gpus}
        unknown = sorted(set(reported) - set(worker.gpus))
        if unknown:
            raise NotFound(
                f"workers/{worker.worker_id} has no GPU {unknown[0]}",
                reason="GPU_NOT_FOUND",
                violations=[FieldViolation("gpus.index", f"no GPU {i}") for i in unknown],
                metadata={"worker": worker.worker_id, "gpu_index": str(unknown[0])},
            )
        cmds: list[Command] = []
        changed = placeable = False
        for index in sorted(worker.gpus):
            gpu = worker.gpus[index]
            health = reported.get(index, GpuHealth(index))
            was_out = bool(gpu.quarantine_reason)
            if health.measurement is not None and health.measurement != gpu.measurement:
                if judged(gpu, health.measurement):
                    placeable = True  # it may pass filters it failed (or the reverse)
                changed = True
            if quarantine(gpu, health, ev.now):
                changed = True
                if was_out and not gpu.quarantine_reason:
                    placeable = True  # back in service
            if gpu.quarantine_reason and gpu.holder is not None:
                cmds += self._lose_held(worker, gpu, ev.now)
        if changed:
            self._worker_changed(worker.worker_id)
        if placeable:
            self._out.schedule = True
        return cmds

    def _lose_held(self, worker: Worker, gpu: Gpu, now: float) -> list[Command]:
        """Lose the attempt holding a quarantined GPU (as an expired lease does) and tell
        the agent to stop it, in case it still runs."""
        assert gpu.holder is not None
        job = self.jobs[gpu.holder[0]]
        attempt = job.attempts[gpu.holder[1] - 1]
        why = f"GPU {gpu.info.index} of {worker.worker_id} quarantined: {gpu.quarantine_reason}"
        cmds = self._lose_attempt(job, attempt, now, why)
        if worker.state != WorkerState.OFFLINE:
            cmds.append(Cancel(worker.worker_id, job.job_id, attempt.number, why))
        return cmds

    def _apply_registered_health(
        self, worker: Worker, health: tuple[GpuHealth, ...], now: float
    ) -> None:
        """A registering agent's GPUs in quarantine (it restarted with them out) and their
        latest re-test figures; GPUs it does not name are healthy."""
        for h in health:
            gpu = worker.gpus.get(h.index)
            if gpu is None:
                continue
            if h.measurement is not None:
                judged(gpu, h.measurement)
            quarantine(gpu, h, now)

    def _reinstate(self, ev: ReinstateRequested) -> list[Command]:
        worker = self.worker(ev.worker_id)
        gpu = worker.gpus.get(ev.gpu_index)
        if gpu is None:
            raise NotFound(
                f"workers/{worker.worker_id} has no GPU {ev.gpu_index}",
                reason="GPU_NOT_FOUND",
                violations=[FieldViolation("gpu_index", f"no GPU {ev.gpu_index} on the worker")],
                metadata={"worker": worker.worker_id, "gpu_index": str(ev.gpu_index)},
            )
        where = {"worker": worker.worker_id, "gpu_index": str(ev.gpu_index)}
        if worker.state == WorkerState.OFFLINE:
            raise FailedPrecondition(
                f"workers/{worker.worker_id} is offline: its agent cannot re-test GPU "
                f"{ev.gpu_index} until it is back",
                reason="WORKER_OFFLINE",
                metadata=where,
            )
        if not gpu.reinstate_required:
            state = "quarantined, on probation" if gpu.quarantine_reason else "in service"
            raise FailedPrecondition(
                f"GPU {ev.gpu_index} of workers/{worker.worker_id} is not held out for the "
                f"operator ({state}); only a GPU quarantined three times in 24 h needs reinstating",
                reason="GPU_NOT_HELD_OUT",
                metadata=where,
            )
        return [SendReinstate(worker.worker_id, ev.gpu_index, ev.requested_by)]
