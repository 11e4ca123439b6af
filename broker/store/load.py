"""Reading the core's records back: rows to ``broker.records``, for ``BrokerCore.restore``.

The records are built here and handed over whole (``StoredState``); the core rebuilds its
queue, caches and indexes from them, and gives every worker a fresh lease.
"""

from __future__ import annotations

import json

from sqlmodel import Session, col, select

from broker.economics import LedgerEntry
from broker.gpu_health import judged
from broker.model import AttemptState, GpuInfo, JobState, SlaKind, WorkerState
from broker.records import (
    Attempt,
    AttemptOutput,
    Gpu,
    HistoryEntry,
    Job,
    SlaEvent,
    StoredState,
    Worker,
)
from broker.scheduler import Rejection
from broker.store.rows import (
    AttemptRow,
    CurtailmentRow,
    FarmRow,
    GpuRow,
    JobEventRow,
    JobRow,
    SlaEventRow,
    WorkerRow,
    farm_terms,
    measurement_from_json,
    power_curve_from_json,
    spec_from_json,
)
from broker.store.save import GPU_KEYS, WorkerWritten

__all__ = ["read_state"]


def read_state(s: Session) -> tuple[StoredState, dict[str, WorkerWritten]]:
    """The core's records as the database holds them, and what the store should believe
    it last wrote of each worker.

    What the database holds of a worker's GPUs is what this store "last wrote": the
    first bind after a load (a failover) is then compare-and-set too. The row part is
    left empty, so the worker row is simply written again.
    """
    farms = tuple(farm_terms(farm) for farm in s.exec(select(FarmRow)))
    ledger: tuple[LedgerEntry, ...] = ()  # the ledger stays in the store (ledger_sql)
    workers: list[Worker] = []
    written: dict[str, WorkerWritten] = {}
    jobs: list[Job] = []
    gpus: dict[str, dict[int, Gpu]] = {}
    gpu_rows: dict[str, dict[int, tuple[object, ...]]] = {}
    for g in s.exec(select(GpuRow)):
        holder = (g.holder_job_id, g.holder_attempt) if g.holder_job_id else None
        info = GpuInfo(
            g.index,
            g.uuid,
            g.model,
            g.vram_mb,
            g.power_limit_watts,
            g.price_micros_per_gpu_hour,
            g.pcie_link_width,
            g.pcie_generation,
            measurement_from_json(g.measurement_json),
            power_curve_from_json(g.power_curve_json),
            g.power_limit_settable,
        )
        gpu = Gpu(
            info,
            holder,  # type: ignore[arg-type]
            quarantine_reason=g.quarantine_reason,
            quarantined_at=g.quarantined_at,
            reinstate_required=g.reinstate_required,
            ai_power_limit_watts=g.ai_power_limit_watts,
        )
        judged(gpu, info.measurement)  # the verdict (at the AI limit) follows from the figures
        gpus.setdefault(g.worker_id, {})[g.index] = gpu
        gpu_rows.setdefault(g.worker_id, {})[g.index] = tuple(getattr(g, k) for k in GPU_KEYS)
    for w in s.exec(select(WorkerRow)):
        written[w.id] = WorkerWritten((), gpu_rows.get(w.id, {}))
        workers.append(
            Worker(
                w.id,
                w.farm_id,
                w.hostname,
                w.agent_version,
                WorkerState(w.state),
                lease_expires_at=0.0,  # restore() sets it
                last_heartbeat=w.last_heartbeat,
                gpus=gpus.get(w.id, {}),
                metrics_address=w.metrics_address,
                runtime_name=w.runtime_name,
                runtime_version=w.runtime_version,
                first_seen=w.first_seen,
                offline_since=w.offline_since,
                offline_log=[tuple(x) for x in json.loads(w.reliability_json)[0]],
                outcomes=[tuple(x) for x in json.loads(w.reliability_json)[1]],
                host_ram_mb=w.host_ram_mb,
                cpu_cores=w.cpu_cores,
                disk_write_mbps=w.disk_write_mbps,
            )
        )
    attempts: dict[str, list[Attempt]] = {}
    for a in s.exec(select(AttemptRow).order_by(col(AttemptRow.number))):
        attempts.setdefault(a.job_id, []).append(
            Attempt(
                a.job_id,
                a.number,
                a.worker_id,
                tuple(json.loads(a.gpu_indices_json)),
                a.price_micros_per_gpu_hour,
                a.schedule_time,
                AttemptState(a.state),
                a.start_time,
                a.end_time,
                a.exit_code,
                a.energy_joules,
                a.last_sequence,
                a.message,
                a.charge_micros,
                a.settled,
                a.last_checkpoint_time,
                a.setup_ms,
                AttemptOutput(**json.loads(a.output_json)) if a.output_json else None,
                a.power_limit_watts,
            )
        )
    history: dict[str, list[HistoryEntry]] = {}
    for h in s.exec(select(JobEventRow).order_by(col(JobEventRow.idx))):
        history.setdefault(h.job_id, []).append(
            HistoryEntry(
                h.time,
                JobState(h.from_state) if h.from_state else None,
                JobState(h.to_state),
                h.reason,
            )
        )
    sla: dict[str, list[SlaEvent]] = {}
    for r in s.exec(select(SlaEventRow).order_by(col(SlaEventRow.idx))):
        sla.setdefault(r.job_id, []).append(
            SlaEvent(SlaKind(r.kind), r.time, r.attempt, r.seconds, r.credit_micros, r.detail)
        )
    for j in s.exec(select(JobRow).order_by(col(JobRow.create_time))):
        job = Job(
            j.id,
            j.owner,
            spec_from_json(j.spec_json),
            j.create_time,
            request_id=j.request_id,
            state=JobState(j.state),
            update_time=j.update_time,
            attempts=attempts.get(j.id, []),
            history=history.get(j.id, []),
            pending_reasons=tuple(Rejection(*r) for r in json.loads(j.pending_reasons_json)),
            status_message=j.status_message,
            exit_code=j.exit_code,
            sla_events=sla.get(j.id, []),
            credit_micros=j.credit_micros,
            checkpoint_sha256=j.checkpoint_sha256,
            checkpoint_time=j.checkpoint_time,
        )
        jobs.append(job)
    curtailments = tuple(row.window() for row in s.exec(select(CurtailmentRow)))
    return StoredState(farms, tuple(workers), tuple(jobs), ledger, curtailments), written
