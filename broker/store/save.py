"""Writing the core's records: only the rows that changed since this store's last commit.

:class:`Writer` remembers, per worker and per unfinished job, the values this store last
committed. The first write of a record merges (reads the row, then writes it); after that
only the rows that changed are written, without reading first (a bind touches one GPU
row, not all of them). A GPU's holder changes by compare-and-set on the row
(:func:`bind_if_unchanged`): with broker replicas, a second writer that believed it led
finds the row changed and gets ``StaleWriter``, so a GPU is never bound twice. The
memory is updated only once a transaction committed (:meth:`Writer.committed`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import Table, bindparam, delete, func
from sqlalchemy.sql.dml import Update
from sqlmodel import Session, SQLModel, col, select

from broker.errors import StaleWriter
from broker.events import Writes
from broker.model import TERMINAL_JOB_STATES, GpuInfo
from broker.records import Attempt, Gpu, Job, Worker
from broker.store.rows import (
    AttemptRow,
    GpuRow,
    JobEventRow,
    JobRow,
    LedgerRow,
    LogRow,
    SlaEventRow,
    WorkerRow,
    measurement_to_json,
    power_curve_to_json,
    spec_to_json,
)

if TYPE_CHECKING:
    from broker.core import BrokerCore

__all__ = ["GPU_KEYS", "JobWritten", "WorkerWritten", "Writer"]


class Writer:
    """What this store last committed, and the writes that rely on it."""

    def __init__(self) -> None:
        self.workers: dict[str, WorkerWritten] = {}
        self.jobs: dict[str, JobWritten] = {}  # unfinished jobs (and live attempts) only

    def write(
        self, s: Session, core: BrokerCore, writes: Writes
    ) -> tuple[dict[str, WorkerWritten], dict[str, JobWritten]]:
        """Add ``writes`` to the session's transaction: its jobs and workers as the core
        holds them now (``core.job``, ``core.worker``), its ledger entries and log lines.
        Returns what to remember once the transaction commits."""
        workers: dict[str, WorkerWritten] = {}
        jobs: dict[str, JobWritten] = {}
        # Workers first: attempts and GPU holders refer to them.
        for worker_id in sorted(writes.worker_ids):
            workers[worker_id] = self._worker(s, core.worker(worker_id))
        for job_id in sorted(writes.job_ids):
            jobs[job_id] = self._job(s, core.job(job_id))
        if writes.ledger:  # a LedgerEntry's fields are the row's columns, but its id
            _insert(s, LedgerRow, [dataclasses.asdict(e) for e in writes.ledger])
        if writes.logs:
            logs = [
                {"job_id": x.job_id, "attempt": x.attempt, "sequence": x.sequence, "data": x.data}
                for x in writes.logs
            ]
            _insert(s, LogRow, logs)
        return workers, jobs

    def committed(
        self,
        core: BrokerCore,
        workers: dict[str, WorkerWritten],
        jobs: dict[str, JobWritten],
    ) -> None:
        """Remember what a committed transaction wrote (a failed one leaves the memory)."""
        self.workers.update(workers)
        for job_id, written in jobs.items():
            job = core.job(job_id)
            if job.state in TERMINAL_JOB_STATES and not (job.current and job.current.live):
                self.jobs.pop(job_id, None)  # settled: rarely written again, merge then
            else:
                self.jobs[job_id] = written

    def _worker(self, s: Session, w: Worker) -> WorkerWritten:
        row = _worker_values(w)
        gpus = {index: _gpu_values(w.worker_id, gpu) for index, gpu in w.gpus.items()}
        written = WorkerWritten(
            tuple(row.values()), {i: tuple(g.values()) for i, g in gpus.items()}
        )
        before = self.workers.get(w.worker_id)
        if before is None:
            s.merge(WorkerRow(**row))
            stored = {
                g.index for g in s.exec(select(GpuRow).where(GpuRow.worker_id == w.worker_id))
            }
            for index in stored - set(w.gpus):
                old = s.get(GpuRow, (w.worker_id, index))
                if old is not None:
                    s.delete(old)
            for index, values in gpus.items():
                if index in stored:
                    s.merge(GpuRow(**values))
                else:  # the select just found no such row: merge() would look it up again
                    s.add(GpuRow(**values))
            return written
        if written.row != before.row:
            _update(s, WorkerRow, [row])
        gone = [index for index in before.gpus if index not in gpus]
        if gone:
            s.exec(
                delete(GpuRow).where(
                    col(GpuRow.worker_id) == w.worker_id, col(GpuRow.index).in_(gone)
                )
            )
        fresh = [values for index, values in gpus.items() if index not in before.gpus]
        changed = []
        for index, values in gpus.items():
            if index not in before.gpus or written.gpus[index] == before.gpus[index]:
                continue
            was = before.gpus[index][HOLDER_AT : HOLDER_AT + 2]
            if was == written.gpus[index][HOLDER_AT : HOLDER_AT + 2]:
                changed.append(values)
            else:
                bind_if_unchanged(s, values, was)
        if fresh:
            _insert(s, GpuRow, fresh)
        if changed:
            _update(s, GpuRow, changed)
        return written

    def _job(self, s: Session, job: Job) -> JobWritten:
        row = _job_values(job)
        attempts = {a.number: _attempt_values(job.job_id, a) for a in job.attempts}
        written = JobWritten(
            tuple(row.values()),
            {n: tuple(a.values()) for n, a in attempts.items()},
            len(job.history),
            len(job.sla_events),
        )
        before = self.jobs.get(job.job_id)
        if before is None and not _update(s, JobRow, [row]):
            # Not stored yet (a new job): no attempt, history or SLA row of it can be either.
            _insert(s, JobRow, [row])
            before = JobWritten(written.row, {}, 0, 0)
        elif before is None:
            for values in attempts.values():
                if not _update(s, AttemptRow, [values]):
                    _insert(s, AttemptRow, [values])
            history_stored = s.exec(
                select(func.count())
                .select_from(JobEventRow)
                .where(JobEventRow.job_id == job.job_id)
            ).one()
            sla_stored = s.exec(
                select(func.count())
                .select_from(SlaEventRow)
                .where(SlaEventRow.job_id == job.job_id)
            ).one()
            for values in _history_values(job, history_stored):
                s.add(JobEventRow(**values))
            for values in _sla_values(job, sla_stored):
                s.add(SlaEventRow(**values))
            return written
        if written.row != before.row:
            _update(s, JobRow, [row])
        fresh = [values for n, values in attempts.items() if n not in before.attempts]
        changed = [
            values
            for n, values in attempts.items()
            if n in before.attempts and written.attempts[n] != before.attempts[n]
        ]
        if fresh:
            _insert(s, AttemptRow, fresh)
        if changed:
            _update(s, AttemptRow, changed)
        history = _history_values(job, before.history)
        if history:
            _insert(s, JobEventRow, history)
        sla = _sla_values(job, before.sla_events)
        if sla:
            _insert(s, SlaEventRow, sla)
        return written


class WorkerWritten(NamedTuple):
    """The values of a worker's row and of its GPU rows as this store last committed them."""

    row: tuple[object, ...]
    gpus: dict[int, tuple[object, ...]]


class JobWritten(NamedTuple):
    """A job's row and attempt rows as last committed, and how many history and SLA rows."""

    row: tuple[object, ...]
    attempts: dict[int, tuple[object, ...]]
    history: int
    sla_events: int


def _worker_values(w: Worker) -> dict[str, Any]:
    return {
        "id": w.worker_id,
        "farm_id": w.farm_id,
        "hostname": w.hostname,
        "agent_version": w.agent_version,
        "state": w.state.value,
        "last_heartbeat": w.last_heartbeat,
        "metrics_address": w.metrics_address,
        "runtime_name": w.runtime_name,
        "runtime_version": w.runtime_version,
        "first_seen": w.first_seen,
        "offline_since": w.offline_since,
        "reliability_json": json.dumps([w.offline_log, w.outcomes]),
        "host_ram_mb": w.host_ram_mb,
        "cpu_cores": w.cpu_cores,
        "disk_write_mbps": w.disk_write_mbps,
    }


def bind_if_unchanged(s: Session, values: dict[str, Any], was: tuple[object, ...]) -> None:
    """Change a GPU's holder only if the row still holds what this store last wrote.

    Compare-and-set on the row: with broker replicas, a second writer that believed
    it led (for a moment, during a failover) finds the row changed and gets
    StaleWriter, its transaction rolls back, and a GPU is never bound twice.
    """
    s.flush()
    params = {**values, "pk_worker_id": values["worker_id"], "pk_index": values["index"]}
    params |= {"was_job": was[0], "was_attempt": was[1]}
    if s.connection().execute(_bind_stmt(tuple(values)), params).rowcount != 1:
        raise StaleWriter(
            f"GPU {values['index']} of workers/{values['worker_id']} was changed by another "
            "broker; this one stops writing",
            metadata={"worker": str(values["worker_id"]), "gpu_index": str(values["index"])},
        )


# Rows are written with Core statements on the session's connection: the ORM's bulk paths
# (``s.exec(update(JobRow), params=...)``) cost several times more per row and the store
# holds no ORM objects of these rows to keep in step (profile of the soak, issue 17).


def _table(model: type[SQLModel]) -> Table:
    return model.__table__  # type: ignore[attr-defined]


@functools.cache
def _keys(model: type[SQLModel]) -> tuple[str, ...]:
    """The names of the primary key's columns."""
    return tuple(c.name for c in _table(model).primary_key.columns)


@functools.cache
def _update_stmt(model: type[SQLModel], columns: tuple[str, ...]) -> Update:
    """UPDATE of ``columns`` by primary key, the key's values bound as ``pk_<name>``."""
    table, keys = _table(model), _keys(model)
    return (
        table.update()
        .where(*(table.c[k] == bindparam(f"pk_{k}") for k in keys))
        .values({c: bindparam(c) for c in columns if c not in keys})
    )


@functools.cache
def _bind_stmt(columns: tuple[str, ...]) -> Update:
    """``_update_stmt`` of a GPU row that also requires the holder it was (``was_job``,
    ``was_attempt``): the compare-and-set of :func:`bind_if_unchanged`."""
    gpus = _table(GpuRow)
    return _update_stmt(GpuRow, columns).where(
        gpus.c.holder_job_id.is_not_distinct_from(bindparam("was_job")),
        gpus.c.holder_attempt.is_not_distinct_from(bindparam("was_attempt")),
    )


def _update(s: Session, model: type[SQLModel], rows: list[dict[str, Any]]) -> int:
    """Write ``rows`` (every column, the primary key included) over the stored rows;
    returns how many rows matched (meaningful for one row: 0 when it is not stored)."""
    s.flush()  # the ORM's pending rows (a worker's first write) go first: keys refer to them
    stmt = _update_stmt(model, tuple(rows[0]))
    params = [{**r, **{f"pk_{k}": r[k] for k in _keys(model)}} for r in rows]
    result = s.connection().execute(stmt, params[0] if len(params) == 1 else params)
    return int(result.rowcount)


def _insert(s: Session, model: type[SQLModel], rows: list[dict[str, Any]]) -> None:
    s.flush()
    s.connection().execute(_table(model).insert(), rows)


def _gpu_values(worker_id: str, gpu: Gpu) -> dict[str, Any]:
    i = gpu.info
    return {
        "worker_id": worker_id,
        "index": i.index,
        "uuid": i.uuid,
        "model": i.model,
        "vram_mb": i.vram_mb,
        "power_limit_watts": i.power_limit_watts,
        "price_micros_per_gpu_hour": i.price_micros_per_gpu_hour,
        "pcie_link_width": i.pcie_link_width,
        "holder_job_id": gpu.holder[0] if gpu.holder else None,
        "holder_attempt": gpu.holder[1] if gpu.holder else None,
        "pcie_generation": i.pcie_generation,
        "measurement_json": measurement_to_json(gpu.measurement),
        "quarantine_reason": gpu.quarantine_reason,
        "quarantined_at": gpu.quarantined_at,
        "reinstate_required": gpu.reinstate_required,
        "power_curve_json": power_curve_to_json(i.power_curve),
        "power_limit_settable": i.power_limit_settable,
        "ai_power_limit_watts": gpu.ai_power_limit_watts,
    }


#: The columns of ``_gpu_values`` in order, and where holder_job_id and holder_attempt sit.
GPU_KEYS = tuple(_gpu_values("", Gpu(GpuInfo(0, "", "", 0), None)))
HOLDER_AT = GPU_KEYS.index("holder_job_id")


def _job_values(job: Job) -> dict[str, Any]:
    return {
        "id": job.job_id,
        "owner": job.owner,
        "request_id": job.request_id,
        "spec_json": spec_to_json(job.spec),
        "state": job.state.value,
        "create_time": job.create_time,
        "update_time": job.update_time,
        "status_message": job.status_message,
        "exit_code": job.exit_code,
        "credit_micros": job.credit_micros,
        "checkpoint_sha256": job.checkpoint_sha256,
        "checkpoint_time": job.checkpoint_time,
        "pending_reasons_json": json.dumps(
            [
                [r.resource, r.requested, r.available, r.resolvable, r.message]
                for r in job.pending_reasons
            ]
        ),
    }


def _attempt_values(job_id: str, a: Attempt) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "number": a.number,
        "worker_id": a.worker_id,
        "gpu_indices_json": json.dumps(list(a.gpu_indices)),
        "price_micros_per_gpu_hour": a.price_micros_per_gpu_hour,
        "state": a.state.value,
        "schedule_time": a.schedule_time,
        "start_time": a.start_time,
        "end_time": a.end_time,
        "exit_code": a.exit_code,
        "energy_joules": a.energy_joules,
        "last_sequence": a.last_sequence,
        "message": a.message,
        "charge_micros": a.charge_micros,
        "settled": a.settled,
        "last_checkpoint_time": a.last_checkpoint_time,
        "setup_ms": a.setup_ms,
        "output_json": json.dumps(dataclasses.asdict(a.output), sort_keys=True) if a.output else "",
        "output_sha256": a.output.sha256 if a.output else "",
        "power_limit_watts": a.power_limit_watts,
    }


def _history_values(job: Job, start: int) -> list[dict[str, Any]]:
    return [
        {
            "job_id": job.job_id,
            "idx": idx,
            "time": h.time,
            "from_state": h.from_state.value if h.from_state else None,
            "to_state": h.to_state.value,
            "reason": h.reason,
        }
        for idx, h in enumerate(job.history[start:], start)
    ]


def _sla_values(job: Job, start: int) -> list[dict[str, Any]]:
    return [
        {
            "job_id": job.job_id,
            "idx": idx,
            "kind": ev.kind.value,
            "time": ev.time,
            "attempt": ev.attempt,
            "seconds": ev.seconds,
            "credit_micros": ev.credit_micros,
            "detail": ev.detail,
        }
        for idx, ev in enumerate(job.sla_events[start:], start)
    ]
