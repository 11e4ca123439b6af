"""Reading the core's records back: rows to ``broker.records``, for ``BrokerCore.restore``.

The records are built here and handed over whole (``StoredState``); the core rebuilds its
queue, caches and indexes from them, and gives every worker a fresh lease. Only the live
work is read (jobs that have not finished, and finished ones with a live attempt); the
finished jobs stay in the store, read when asked for (``broker.store.reads``).
"""

from __future__ import annotations

import json

from sqlmodel import Session, select

from broker.economics import LedgerEntry
from broker.gpu_health import judged
from broker.model import GpuInfo, WorkerState
from broker.records import Gpu, StoredState, Worker
from broker.store.reads import jobs_where, live_job_ids
from broker.store.rows import (
    CurtailmentRow,
    FarmRow,
    GpuRow,
    WorkerRow,
    farm_terms,
    measurement_from_json,
    power_curve_from_json,
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
                outcomes=[_outcome(x) for x in json.loads(w.reliability_json)[1]],
                host_ram_mb=w.host_ram_mb,
                cpu_cores=w.cpu_cores,
                disk_write_mbps=w.disk_write_mbps,
            )
        )
    jobs = jobs_where(s, live_job_ids())  # live work only: finished jobs stay in the store
    curtailments = tuple(row.window() for row in s.exec(select(CurtailmentRow)))
    return StoredState(farms, tuple(workers), tuple(jobs), ledger, curtailments), written


def _outcome(stored: list[float | int | bool]) -> tuple[float, int, int]:
    """A worker's stored outcome bucket; a row from before the buckets holds one attempt
    as ``[time, ok]``."""
    if len(stored) == 2:
        time, ok = stored
        return (float(time), int(bool(ok)), int(not ok))
    time, good, bad = stored
    return (float(time), int(good), int(bad))
