"""Reading jobs back from the store: whole records (``broker.records.Job``) of the jobs a
query selects, for the restore (live work only) and for the reads of finished jobs the
core has let go of (docs/scale.md section 1).

Every read builds its jobs with :func:`jobs_where` from a selection of job ids: the job
rows, then their attempts, history and SLA events, four queries however many jobs.
:func:`list_jobs` is ListJobs as one query over ``jobs`` with keyset paging on
``(create_time, id)``: newest first, ties by id (the indexes of migration 0010).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection
from typing import Any, NamedTuple

from sqlalchemy import and_, or_
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import Select

from broker.model import (
    LIVE_ATTEMPT_STATES,
    TERMINAL_JOB_STATES,
    AttemptState,
    JobState,
    SlaKind,
)
from broker.records import Attempt, AttemptOutput, HistoryEntry, Job, SlaEvent
from broker.scheduler import Rejection
from broker.store.rows import AttemptRow, JobEventRow, JobRow, SlaEventRow, spec_from_json

__all__ = [
    "JobReads",
    "PageKey",
    "job_id_for_request",
    "jobs_where",
    "list_jobs",
    "live_job_ids",
    "load_job",
    "owners_needing",
    "owners_of_output",
    "recent_artifacts",
    "request_query",
]

_TERMINAL = sorted(s.value for s in TERMINAL_JOB_STATES)
_LIVE = sorted(s.value for s in LIVE_ATTEMPT_STATES)


class PageKey(NamedTuple):
    """Where a ListJobs page ends: the last job's ``(create_time, id)``."""

    create_time: float
    job_id: str


def live_job_ids() -> Any:
    """The ids of the live work, as a subquery: jobs that have not finished, and finished
    ones with a live attempt (a cancelled job whose agent has not confirmed yet)."""
    live_attempts = select(AttemptRow.job_id).where(col(AttemptRow.state).in_(_LIVE))
    return select(JobRow.id).where(
        or_(col(JobRow.state).not_in(_TERMINAL), col(JobRow.id).in_(live_attempts))
    )


def jobs_where(s: Session, ids: Any) -> list[Job]:
    """The jobs whose ids ``ids`` selects (a subquery or a collection), oldest first, with
    their attempts, history and SLA events."""
    attempts: dict[str, list[Attempt]] = {}
    q_attempts = select(AttemptRow).where(col(AttemptRow.job_id).in_(ids))
    for a in s.exec(q_attempts.order_by(col(AttemptRow.job_id), col(AttemptRow.number))):
        attempts.setdefault(a.job_id, []).append(_attempt(a))
    history: dict[str, list[HistoryEntry]] = {}
    q_history = select(JobEventRow).where(col(JobEventRow.job_id).in_(ids))
    for h in s.exec(q_history.order_by(col(JobEventRow.job_id), col(JobEventRow.idx))):
        from_state = JobState(h.from_state) if h.from_state else None
        entry = HistoryEntry(h.time, from_state, JobState(h.to_state), h.reason)
        history.setdefault(h.job_id, []).append(entry)
    sla: dict[str, list[SlaEvent]] = {}
    q_sla = select(SlaEventRow).where(col(SlaEventRow.job_id).in_(ids))
    for r in s.exec(q_sla.order_by(col(SlaEventRow.job_id), col(SlaEventRow.idx))):
        event = SlaEvent(SlaKind(r.kind), r.time, r.attempt, r.seconds, r.credit_micros, r.detail)
        sla.setdefault(r.job_id, []).append(event)
    q_jobs = select(JobRow).where(col(JobRow.id).in_(ids))
    rows = s.exec(q_jobs.order_by(col(JobRow.create_time), col(JobRow.id)))
    return [_job(j, attempts, history, sla) for j in rows]


def load_job(s: Session, job_id: str) -> Job | None:
    """One job, whole; None when the store has no such job."""
    jobs = jobs_where(s, [job_id])
    return jobs[0] if jobs else None


def list_jobs(
    s: Session,
    owner: str | None,
    states: Collection[JobState],
    limit: int,
    after: PageKey | None,
) -> tuple[list[Job], PageKey | None]:
    """One ListJobs page: ``owner``'s jobs (None: everyone's) in ``states`` (empty: any),
    newest first (ties by id), after the key ``after``; and the key of the next page
    (None after the last). One query selects the page; its records follow."""
    q = select(JobRow.id, JobRow.create_time)
    if owner is not None:
        q = q.where(JobRow.owner == owner)
    if states:
        q = q.where(col(JobRow.state).in_(sorted(s.value for s in states)))
    if after is not None:
        q = q.where(
            or_(
                col(JobRow.create_time) < after.create_time,
                and_(col(JobRow.create_time) == after.create_time, col(JobRow.id) > after.job_id),
            )
        )
    q = q.order_by(col(JobRow.create_time).desc(), col(JobRow.id)).limit(limit + 1)
    keys = [PageKey(t, i) for i, t in s.exec(q)]
    shown = keys[:limit]
    by_id = {j.job_id: j for j in jobs_where(s, [k.job_id for k in shown])}
    nxt = shown[-1] if len(keys) > limit else None
    return [by_id[k.job_id] for k in shown], nxt


def job_id_for_request(s: Session, owner: str, request_id: str) -> str | None:
    """The job an earlier CreateJob of ``owner`` with ``request_id`` created, if any."""
    found = [(float(t), str(i)) for i, t in s.exec(request_query(owner, request_id))]
    return min(found)[1] if found else None  # the earliest, ties by id


def request_query(owner: str, request_id: str) -> Select[str, float]:
    """The jobs of ``owner`` created with ``request_id``: (id, create_time)."""
    # No ORDER BY ... LIMIT 1 here: with one, SQLite walks the owner's whole history in
    # (owner, create_time) order instead of seeking (owner, request_id), and CreateJob
    # slows with every job the owner ever ran. A request id names one job, rarely two.
    return select(JobRow.id, JobRow.create_time).where(
        JobRow.owner == owner, JobRow.request_id == request_id
    )


def owners_needing(s: Session, sha256: str, owner: str) -> bool:
    """True when a stored job of ``owner`` names ``sha256`` as its working directory,
    checkpoint or an input (``broker.api.artifacts``)."""
    q = select(JobRow.id, JobRow.spec_json, JobRow.checkpoint_sha256).where(
        JobRow.owner == owner,
        or_(
            col(JobRow.checkpoint_sha256) == sha256,
            col(JobRow.spec_json).contains(sha256, autoescape=True),
        ),
    )
    for _, spec_json, checkpoint in s.exec(q):
        spec = spec_from_json(spec_json)
        if sha256 in (checkpoint, spec.working_dir_sha256, *(h for _, h in spec.inputs)):
            return True
    return False


def owners_of_output(s: Session, sha256: str) -> set[str]:
    """The owners of the stored jobs one of whose attempts produced ``sha256``."""
    q = (
        select(JobRow.owner)
        .join(AttemptRow, col(AttemptRow.job_id) == col(JobRow.id))
        .where(AttemptRow.output_sha256 == sha256)
    )
    return set(s.exec(q))


def recent_artifacts(s: Session, since: float) -> set[str]:
    """What the stored jobs that finished at or after ``since`` refer to: working
    directories, inputs and attempt outputs (``broker.retention``). A finished job's
    ``update_time`` is when it finished."""
    recent = select(JobRow.id).where(
        col(JobRow.state).in_(_TERMINAL), col(JobRow.update_time) > since
    )
    keep: set[str] = set()
    for spec_json in s.exec(select(JobRow.spec_json).where(col(JobRow.id).in_(recent))):
        spec = spec_from_json(spec_json)
        keep.add(spec.working_dir_sha256)
        keep.update(h for _, h in spec.inputs)
    outputs = select(AttemptRow.output_sha256).where(
        col(AttemptRow.job_id).in_(recent), AttemptRow.output_sha256 != ""
    )
    keep.update(s.exec(outputs))
    keep.discard("")
    return keep


class JobReads:
    """``Store``'s reads of stored jobs (a mixin: the session is the store's)."""

    def _session(self) -> contextlib.AbstractContextManager[Session]:
        raise NotImplementedError

    def load_job(self, job_id: str) -> Job | None:
        """One job as stored, whole (attempts, history, SLA events, outputs); None when the
        store has no such job."""
        with self._session() as s:
            return load_job(s, job_id)

    def list_jobs(
        self,
        owner: str | None,
        states: Collection[JobState],
        page_size: int,
        after: PageKey | None = None,
    ) -> tuple[list[Job], PageKey | None]:
        """One ListJobs page: ``owner``'s jobs (None: everyone's) in ``states`` (empty:
        any), newest first, after ``after``; and the next page's key (None: the last)."""
        with self._session() as s:
            return list_jobs(s, owner, states, page_size, after)

    def job_id_for_request(self, owner: str, request_id: str) -> str | None:
        """The job an earlier CreateJob of ``owner`` with ``request_id`` created, if any."""
        with self._session() as s:
            return job_id_for_request(s, owner, request_id)

    def refers_to(self, sha256: str, owner: str) -> bool:
        """True when a stored job of ``owner`` names ``sha256`` as its working directory,
        checkpoint or an input."""
        with self._session() as s:
            return owners_needing(s, sha256, owner)

    def output_owners(self, sha256: str) -> set[str]:
        """The owners of the stored jobs one of whose attempts produced ``sha256``."""
        with self._session() as s:
            return owners_of_output(s, sha256)

    def recent_artifacts(self, since: float) -> set[str]:
        """What the stored jobs that finished after ``since`` refer to (retention)."""
        with self._session() as s:
            return recent_artifacts(s, since)


def _attempt(a: AttemptRow) -> Attempt:
    return Attempt(
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


def _job(
    j: JobRow,
    attempts: dict[str, list[Attempt]],
    history: dict[str, list[HistoryEntry]],
    sla: dict[str, list[SlaEvent]],
) -> Job:
    return Job(
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
