"""The store on SQLite and a real PostgreSQL: migrations, model/migration agreement, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import text
from sqlmodel import SQLModel

from broker.cli import broker_group
from broker.core import BrokerCore
from broker.economics import FarmTerms
from broker.events import (
    AttemptFinished,
    AttemptStarted,
    FarmConfigured,
    JobSubmitted,
    SchedulePass,
    WorkerRegistered,
    Writes,
)
from broker.invariants import validate_state
from broker.model import GpuInfo, JobSpec, Tier
from broker.schema import SchemaOutOfDate, current_revision, head_revision
from broker.store import FarmRow, Store
from harness.broker_fixtures import healthy


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    return request.getfixturevalue("fresh_postgres_url")


def test_migrations_create_exactly_the_models(db_url: str):
    store = Store(db_url)
    try:
        assert current_revision(store.engine) == head_revision()
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
    finally:
        store.close()


def test_core_state_round_trips_through_the_store(db_url: str):
    store = Store(db_url)
    store.create_farm(
        FarmRow(id="f", display_name="f", enrollment_token_sha256="x", broker_fee_permille=150)
    )
    core = BrokerCore()
    # a price past 32 bits: BIGINT; healthy figures: verified, so the job runs
    gpu = GpuInfo(0, "u0", "RTX 3090", 24576, 350, 2**40, measurement=healthy())
    events = [
        FarmConfigured(0.0, FarmTerms("f", broker_fee_permille=150)),
        WorkerRegistered(0.0, "w", "f", "rig", "1", (gpu,)),
        JobSubmitted(1.0, "j", "alice", JobSpec(command=("x",), tier=Tier.SPOT), "req"),
        SchedulePass(1.0),
        AttemptStarted(2.0, "w", "j", 1, 1),
        AttemptFinished(5.0, "w", "j", 1, 2, 0, energy_joules=3 * 10**12),
        JobSubmitted(6.0, "k", "alice", JobSpec(command=("y",), gpu_count=2)),
        SchedulePass(6.0),
    ]
    for ev in events:
        store.save(core, Writes.of(core.handle(ev)))
    store.close()

    again = BrokerCore(keep_ledger=False)  # as the broker: the ledger stays in the store
    store = Store(db_url)
    store.load(again, now=10.0)
    balances = store.balances()
    problems, _ = store.ledger_check()
    validate_state(again)
    assert set(again.jobs) == {"k"}  # a restart loads live work only; "j" finished
    j = store.load_job("j")
    assert j is not None
    assert (j.state, j.spec.tier, j.request_id) == ("SUCCEEDED", Tier.SPOT, "req")
    assert j.attempts[0].energy_joules == 3 * 10**12
    assert j.attempts[0].charge_micros == core.jobs["j"].attempts[0].charge_micros > 0
    assert [h.to_state for h in j.history] == [h.to_state for h in core.jobs["j"].history]
    assert again.jobs["k"].pending_reasons == core.jobs["k"].pending_reasons
    assert again.ledger == [] and problems == []
    posted: dict[str, int] = {}
    for e in core.ledger:
        posted[e.account] = posted.get(e.account, 0) + e.amount_micros
    assert balances == posted and posted
    assert again.farms["f"].broker_fee_permille == 150
    assert again.requests == {}
    assert store.job_id_for_request("alice", "req") == "j"
    store.close()


def test_broker_refuses_an_old_schema_until_migrated(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    Store(url).close()
    store = Store(url, create=False)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0000'"))
    store.close()
    with pytest.raises(SchemaOutOfDate, match="rigshift broker migrate"):
        Store(url)
    with Store(url, create=False).engine.begin() as conn:
        conn.execute(text(f"UPDATE alembic_version SET version_num = '{head_revision()}'"))
    runner = CliRunner()
    result = runner.invoke(broker_group, ["migrate", "--db", url])
    assert result.exit_code == 0, result.output
    assert f"schema at {head_revision()}" in result.output
    Store(url).close()  # starts fine now


def test_a_job_runs_end_to_end_on_postgresql(fresh_postgres_url: str, tmp_path: Path):
    from broker_harness import start_broker
    from protocol_agent import ProtocolAgent, authed_channel, create_farm, gpus

    from rigshift.v1 import job_pb2
    from rigshift.v1 import job_service_pb2 as js
    from rigshift.v1 import job_service_pb2_grpc as jsg

    b = start_broker(tmp_path / "b", db_url=fresh_postgres_url)
    try:
        farm = create_farm(b.address)
        agent = ProtocolAgent(b.address, farm.enrollment_token, gpus(1))
        agent.register()
        agent.connect()
        with authed_channel(b.address) as ch:
            jobs = jsg.JobServiceStub(ch)
            job = jobs.CreateJob(
                js.CreateJobRequest(spec=job_pb2.JobSpec(command=["x"], gpu_count=1))
            )
            a = agent.next_of("assignment")
            agent.start(a.job, 1)
            agent.finish(a.job, 1, energy=42)
            import time

            deadline = time.monotonic() + 10
            while jobs.GetJob(js.GetJobRequest(name=job.name)).state != job_pb2.Job.SUCCEEDED:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        agent.close()
    finally:
        b.stop()
    b2 = start_broker(tmp_path / "b", db_url=fresh_postgres_url)  # restart on the same PG
    try:
        job_id = job.name.split("/")[1]
        assert job_id not in b2.broker.service.core.jobs  # finished: read from the store
        restored = b2.broker.service.read_job(job_id)
        assert (restored.state, restored.attempts[0].energy_joules) == ("SUCCEEDED", 42)
    finally:
        b2.stop()


def test_concurrent_first_starts_on_postgresql_migrate_once(fresh_postgres_url: str):
    from concurrent.futures import ThreadPoolExecutor

    def start() -> str | None:
        store = Store(fresh_postgres_url)
        try:
            return current_revision(store.engine)
        finally:
            store.close()

    with ThreadPoolExecutor(4) as pool:
        revisions = list(pool.map(lambda _: start(), range(4)))
    assert revisions == [head_revision()] * 4
