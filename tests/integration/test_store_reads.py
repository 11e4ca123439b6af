"""``broker.store.reads`` on SQLite and PostgreSQL: ListJobs' keyset pages (filters, ties
on create_time), request ids, and a restart that loads live work only."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.core import BrokerCore
from broker.events import (
    AttemptFinished,
    AttemptStarted,
    CancelRequested,
    JobsStored,
    JobSubmitted,
    SchedulePass,
    WorkerRegistered,
    Writes,
)
from broker.invariants import validate_state
from broker.model import GpuInfo, JobSpec, JobState
from broker.store import FarmRow, Store
from harness.broker_fixtures import healthy

#: (job id, owner, create time, request id); "t1" and "t2" tie on create_time.
JOBS = [
    ("a1", "alice", 1.0, "r1"),
    ("b1", "bob", 2.0, ""),
    ("t2", "alice", 3.0, ""),
    ("t1", "alice", 3.0, ""),
    ("a4", "alice", 4.0, "r4"),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    if request.param == "postgresql":
        url = request.getfixturevalue("fresh_postgres_url")
    s = Store(url)
    s.create_farm(FarmRow(id="f", display_name="f", enrollment_token_sha256="x"))
    yield s
    s.close()


@pytest.fixture
def core(store: Store) -> BrokerCore:
    """a1 succeeded on w (one GPU), a4 was cancelled while pending, the rest wait."""
    c = BrokerCore()
    gpu = GpuInfo(0, "u0", "RTX 3090", 24576, 350, 300_000, measurement=healthy())

    def apply(ev) -> None:
        writes = Writes.of(c.handle(ev))
        store.save(c, writes)
        c.handle(JobsStored(ev.now, writes.job_ids))

    apply(WorkerRegistered(0.0, "w", "f", "rig", "1", (gpu,)))
    for job_id, owner, t, request_id in JOBS:
        model = "RTX 3090" if job_id == "a1" else "none-such"
        apply(JobSubmitted(t, job_id, owner, JobSpec(("x",), gpu_model=model), request_id))
    apply(SchedulePass(4.0))
    apply(AttemptStarted(5.0, "w", "a1", 1, 1))
    apply(AttemptFinished(6.0, "w", "a1", 1, 2, 0))
    apply(CancelRequested(7.0, "a4"))
    return c


def pages(store: Store, owner: str | None, states: set[JobState], size: int) -> list[list[str]]:
    out, after = [], None
    while True:
        jobs, after = store.list_jobs(owner, states, size, after)
        out.append([j.job_id for j in jobs])
        if after is None:
            return out


@pytest.mark.parametrize(
    ("owner", "states", "size", "expected"),
    [
        (None, set(), 100, [["a4", "t1", "t2", "b1", "a1"]]),  # newest first, ties by id
        (None, set(), 2, [["a4", "t1"], ["t2", "b1"], ["a1"]]),
        ("alice", set(), 3, [["a4", "t1", "t2"], ["a1"]]),
        ("alice", {JobState.PENDING}, 1, [["t1"], ["t2"]]),
        (None, {JobState.SUCCEEDED, JobState.CANCELLED}, 5, [["a4", "a1"]]),
        ("bob", {JobState.SUCCEEDED}, 5, [[]]),
        ("carol", set(), 5, [[]]),
    ],
)
def test_list_jobs_pages_by_keyset(store, core, owner, states, size, expected):
    assert pages(store, owner, states, size) == expected


def test_finished_jobs_are_whole_in_the_store_and_gone_from_the_core(store, core):
    assert set(core.jobs) == {"b1", "t1", "t2"}
    assert core.requests == {}
    done = store.load_job("a1")
    assert done is not None
    assert (done.state, done.exit_code, len(done.attempts)) == (JobState.SUCCEEDED, 0, 1)
    assert done.attempts[0].settled and done.attempts[0].charge_micros > 0
    assert [h.to_state for h in done.history][-1] == JobState.SUCCEEDED
    assert store.load_job("nope") is None
    assert store.job_id_for_request("alice", "r1") == "a1"
    assert store.job_id_for_request("alice", "r4") == "a4"
    assert store.job_id_for_request("bob", "r1") is None


def test_a_restart_loads_the_live_jobs_only(store, core):
    again = BrokerCore()
    store.load(again, now=10.0)
    assert set(again.jobs) == {"b1", "t1", "t2"}
    assert set(again.pending) == {"b1", "t1", "t2"}
    validate_state(again)


def test_a_cancelled_job_with_a_live_attempt_is_loaded_until_the_agent_confirms(store, core):
    gpu = GpuInfo(0, "u0", "RTX 3090", 24576, 350, 300_000, measurement=healthy())
    c = BrokerCore()
    store.load(c, now=10.0)
    c.handle(WorkerRegistered(10.0, "w2", "f", "rig2", "1", (gpu,)))
    cmds = c.handle(JobSubmitted(11.0, "live", "alice", JobSpec(("x",))))
    cmds += c.handle(SchedulePass(11.0))
    cmds += c.handle(CancelRequested(12.0, "live"))
    store.save(c, Writes.of(cmds))
    again = BrokerCore()
    store.load(again, now=13.0)
    assert "live" in again.jobs and again.jobs["live"].state == JobState.CANCELLED
    validate_state(again)


def test_a_request_id_is_looked_up_by_its_index_not_by_walking_the_owners_history(tmp_path):
    """CreateJob looks a request id up on every call: on SQLite its query must seek the
    (owner, request_id) index. With ORDER BY create_time LIMIT 1 the planner walked the
    owner's whole history instead, and CreateJob slowed with every job ever run."""
    from sqlalchemy import text
    from sqlalchemy.dialects import sqlite

    from broker.store.reads import request_query

    s = Store(f"sqlite:///{tmp_path / 'broker.db'}")
    try:
        sql = request_query("alice", "r1").compile(
            dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}
        )
        with s.engine.connect() as conn:
            plan = " ".join(str(r[-1]) for r in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
    finally:
        s.close()
    assert "ix_jobs_owner_request_id" in plan, plan


def test_a_worker_stored_before_outcome_buckets_loads_its_attempts_as_buckets(store, core):
    """Rows written before issue 17 hold one ``[time, ok]`` per attempt."""
    from sqlalchemy import text

    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE workers SET reliability_json = :j WHERE id = 'w'"),
            {"j": "[[[1.0, 2.0]], [[3.0, true], [4.0, false]]]"},
        )
    again = BrokerCore()
    store.load(again, now=10.0)
    worker = again.workers["w"]
    assert worker.outcomes == [(3.0, 1, 0), (4.0, 0, 1)]
    assert worker.offline_log == [(1.0, 2.0)]
