"""The core's handling of workers (part of ``BrokerCore``): registration, farms' terms,
heartbeats and leases, draining.

A worker is ONLINE while its lease lasts; each heartbeat renews it for ``lease_ttl_s``.
A ``Tick`` past a lease's end takes the worker OFFLINE and loses its attempts (requeued
while attempts are left), with a ``HEARTBEAT_GAP`` SLA event for each running one; a
heartbeat brings it back. Registering again means a new agent process: whatever the
old one ran is lost; its GPUs are judged anew from the figures it registers with
(``broker.gpu_health``). The same ``Tick`` drops the reliability history that left the
window (``broker.records.trim_history``), so reads of it stay pure.

Power policy: each GPU's AI limit (``broker.gpu_health.ai_limit``) is set at
registration and again whenever its farm's terms change.

GPU asks: a farm's ask for the model wins; an agent's own ask is lifted to the farm's
floor (``broker.economics.floor_price``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from broker.economics import FarmTerms, floor_price
from broker.events import (
    Command,
    DrainRequested,
    FarmConfigured,
    GpuHealth,
    Heartbeat,
    Tick,
    WorkerRegistered,
    WorkerTransition,
)
from broker.gpu_health import ai_limit, apply_power_policy, judged
from broker.model import GpuInfo, JobState, SlaKind, WorkerState
from broker.records import Attempt, Effects, Gpu, Job, SlaEvent, Worker, trim_history

__all__ = ["Workers"]

S = JobState


class Workers:
    """``BrokerCore``'s worker handlers (a mixin: the state is the core's)."""

    if TYPE_CHECKING:
        lease_ttl_s: float
        reliability_window_s: float
        farms: dict[str, FarmTerms]
        jobs: dict[str, Job]
        workers: dict[str, Worker]
        _out: Effects

        def worker(self, worker_id: str) -> Worker: ...

        def _worker_changed(self, worker_id: str) -> None: ...

        def _sla(self, job: Job, event: SlaEvent) -> None: ...

        def _lose_attempt(
            self, job: Job, attempt: Attempt, now: float, why: str
        ) -> list[Command]: ...

        def _apply_registered_health(
            self, worker: Worker, health: tuple[GpuHealth, ...], now: float
        ) -> None: ...

    def _register(self, ev: WorkerRegistered) -> list[Command]:
        old = self.workers.get(ev.worker_id)
        cmds: list[Command] = []
        if old is not None:
            # Registering again means a new agent process: whatever the old one ran is gone.
            for job, attempt in self._held_attempts(old):
                cmds += self._lose_attempt(job, attempt, ev.now, "agent restarted")
        worker = Worker(
            ev.worker_id,
            ev.farm_id,
            ev.hostname,
            ev.agent_version,
            WorkerState.ONLINE,
            lease_expires_at=ev.now + self.lease_ttl_s,
            last_heartbeat=ev.now,
            gpus={g.index: Gpu(self._priced(ev.farm_id, g)) for g in ev.gpus},
            metrics_address=ev.metrics_address,
            runtime_name=ev.runtime_name,
            runtime_version=ev.runtime_version,
            first_seen=old.first_seen if old else ev.now,
            offline_log=old.offline_log if old else [],
            outcomes=old.outcomes if old else [],
            host_ram_mb=ev.host_ram_mb,
            cpu_cores=ev.cpu_cores,
            disk_write_mbps=ev.disk_write_mbps,
        )
        terms = self.farms.get(ev.farm_id)
        for gpu in worker.gpus.values():
            # The AI limit first: the score is the score at that limit.
            gpu.ai_power_limit_watts = ai_limit(gpu.info, terms)
            # Judged from the figures, never from the claimed model alone.
            judged(gpu, gpu.info.measurement)
        self._apply_registered_health(worker, ev.health, ev.now)
        if old is not None and old.offline_since is not None:
            worker.offline_log.append((old.offline_since, ev.now))
        self.workers[ev.worker_id] = worker
        self._worker_changed(worker.worker_id)
        self._out.schedule = True
        prev = old.state if old else None
        if prev != WorkerState.ONLINE:
            cmds.insert(0, WorkerTransition(worker.worker_id, prev, WorkerState.ONLINE))
        return cmds

    def _held_attempts(self, worker: Worker) -> list[tuple[Job, Attempt]]:
        """Live attempts holding this worker's GPUs, each once, in GPU order."""
        out: list[tuple[Job, Attempt]] = []
        seen: set[tuple[str, int]] = set()
        for index in sorted(worker.gpus):
            holder = worker.gpus[index].holder
            if holder is None or holder in seen:
                continue
            seen.add(holder)
            job = self.jobs[holder[0]]
            out.append((job, job.attempts[holder[1] - 1]))
        return out

    def _priced(self, farm_id: str, info: GpuInfo) -> GpuInfo:
        """The farm's ask for the model wins; an agent's own ask is lifted to the floor."""
        terms = self.farms.get(farm_id)
        if terms is None:
            return info
        ask = terms.ask_for(info.model)
        if ask is None:
            floor = floor_price(terms, info.model, info.power_limit_watts or None)
            ask = max(info.price_micros_per_gpu_hour, floor.floor_micros)
        return replace(info, price_micros_per_gpu_hour=ask)

    def _configure_farm(self, ev: FarmConfigured) -> list[Command]:
        self.farms[ev.terms.farm_id] = ev.terms
        for worker in self.workers.values():
            if worker.farm_id != ev.terms.farm_id:
                continue
            for gpu in worker.gpus.values():
                gpu.info = self._priced(worker.farm_id, gpu.info)
                # A new power policy: a new AI limit and the score at it (an attempt
                # running keeps the limit it was placed with).
                apply_power_policy(gpu, ev.terms)
            self._worker_changed(worker.worker_id)
        self._out.schedule = True
        return []

    def _heartbeat(self, ev: Heartbeat) -> list[Command]:
        worker = self.worker(ev.worker_id)
        worker.lease_expires_at = ev.now + self.lease_ttl_s
        worker.last_heartbeat = ev.now
        if ev.environments is not None and frozenset(ev.environments) != worker.environments:
            worker.environments = frozenset(ev.environments)
            self._worker_changed(worker.worker_id)  # the locality score reads them
        if worker.state == WorkerState.OFFLINE:
            if worker.offline_since is not None:
                worker.offline_log.append((worker.offline_since, ev.now))
                worker.offline_since = None
            worker.state = WorkerState.ONLINE
            self._worker_changed(worker.worker_id)
            self._out.schedule = True
            return [WorkerTransition(worker.worker_id, WorkerState.OFFLINE, WorkerState.ONLINE)]
        return []

    def _drain(self, ev: DrainRequested) -> list[Command]:
        worker = self.worker(ev.worker_id)
        if worker.state != WorkerState.ONLINE:
            return []
        worker.state = WorkerState.DRAINING
        self._worker_changed(worker.worker_id)
        return [WorkerTransition(worker.worker_id, WorkerState.ONLINE, WorkerState.DRAINING)]

    def _tick(self, ev: Tick) -> list[Command]:
        cmds: list[Command] = []
        horizon = ev.now - self.reliability_window_s
        for worker in self.workers.values():
            if trim_history(worker, horizon):
                self._worker_changed(worker.worker_id)  # what is kept (and stored) shrank
            if worker.state == WorkerState.OFFLINE or worker.lease_expires_at > ev.now:
                continue
            cmds.append(WorkerTransition(worker.worker_id, worker.state, WorkerState.OFFLINE))
            worker.state = WorkerState.OFFLINE
            worker.offline_since = worker.last_heartbeat
            self._worker_changed(worker.worker_id)
            gap = int(ev.now - worker.last_heartbeat)
            for job, attempt in self._held_attempts(worker):
                if job.current is attempt and job.state in (S.SCHEDULED, S.RUNNING):
                    detail = f"no heartbeat from {worker.worker_id} for {gap} s"
                    self._sla(
                        job, SlaEvent(SlaKind.HEARTBEAT_GAP, ev.now, attempt.number, gap, 0, detail)
                    )
                cmds += self._lose_attempt(job, attempt, ev.now, "worker lease expired")
        return cmds
