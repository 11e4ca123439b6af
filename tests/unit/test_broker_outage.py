"""The shell during a database outage, and how database faults become gRPC statuses.

The service runs on a real SQLite store behind ``FlakyStore``, a fake whose writes fail
while ``down`` is set, exactly as the real store fails them (``DatabaseUnavailable``).
The error mapping is checked against real drivers: a locked and a read-only SQLite
file (a PostgreSQL address nothing listens on is tests/integration/test_store_unreachable.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from sqlalchemy import exc as sa_exc

from broker.api import ERROR_DOMAIN, abort_with, status_code
from broker.core import BrokerCore
from broker.errors import DatabaseUnavailable
from broker.events import (
    AttemptLog,
    AttemptStarted,
    Heartbeat,
    JobSubmitted,
    SchedulePass,
    Tick,
    WorkerRegistered,
)
from broker.model import GpuInfo, JobSpec, JobState
from broker.service import BrokerService
from broker.store import FarmRow, Store, database_error
from harness.broker_fixtures import healthy

T0 = 1_000_000.0


class FlakyStore:
    """A real Store whose writes (and probes) fail while ``down`` holds an error."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down: Exception | None = None

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.down is not None:
            raise self.down
        self.store.save(*args, **kwargs)

    def check_writable(self) -> None:
        if self.down is not None:
            raise self.down
        self.store.check_writable()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


GONE = DatabaseUnavailable("the broker's database cannot be reached (connection refused)")


def _store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'broker.db'}")
    store.create_farm(FarmRow(id="f", display_name="farm", enrollment_token_sha256="x"))
    return store


def _loaded(url: str) -> BrokerCore:
    """What a broker restarted now would know: the database's state."""
    store = Store(url)
    core = BrokerCore()
    store.load(core, now=T0)
    store.close()
    return core


async def _service(store: Store) -> tuple[BrokerService, FlakyStore]:
    flaky = FlakyStore(store)
    svc = BrokerService(BrokerCore(), flaky, clock=lambda: T0)
    svc.db_retry_interval_s = 0.01
    gpus = (
        GpuInfo(0, "GPU-0", "RTX 3090", 24576, measurement=healthy()),
        GpuInfo(1, "GPU-1", "RTX 3090", 24576, measurement=healthy()),
    )
    await svc.apply(WorkerRegistered(T0, "w", "f", "rig", "1", gpus))
    return svc, flaky


async def _recovered(svc: BrokerService) -> None:
    """Start the loops and wait until the database loop has written what was held."""
    svc.start_loops(tick_interval_s=60.0)
    for _ in range(500):
        if svc.database_down_for() is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the service did not recover")


def test_a_failed_write_is_held_and_later_changes_are_refused_until_it_is_written(
    tmp_path: Path,
):
    store = _store(tmp_path)

    async def main() -> None:
        svc, flaky = await _service(store)
        stream = svc.open_stream("w")
        assert stream.get_nowait().WhichOneof("kind") == "reconcile"
        flaky.down = GONE
        spec = JobSpec(command=("train",))
        with pytest.raises(DatabaseUnavailable) as err:
            await svc.apply(JobSubmitted(T0, "j1", "alice", spec, "r1"), SchedulePass(T0))
        assert err.value.reason == "DATABASE_UNAVAILABLE"
        assert "retry with the same request_id" in err.value.message
        assert svc.database_down_for() is not None
        # The core placed the job, but nothing left the process: no assignment pushed.
        assert svc.core.jobs["j1"].state == JobState.SCHEDULED
        assert stream.empty()
        # Every later change is refused before the core sees it...
        with pytest.raises(DatabaseUnavailable, match="refuses changes"):
            await svc.apply(JobSubmitted(T0, "j2", "alice", spec, "r2"))
        assert "j2" not in svc.core.jobs
        with pytest.raises(DatabaseUnavailable):
            await svc.apply(Tick(T0 + 3600))  # no expiry that could not be written
        with pytest.raises(DatabaseUnavailable):
            svc.new_credential("w")
        # ...except heartbeats: leases live in memory.
        await svc.apply(Heartbeat(T0 + 10, "w"))
        assert svc.core.workers["w"].lease_expires_at == T0 + 10 + svc.core.lease_ttl_s
        # A Reconcile now would list an attempt the store does not have.
        with pytest.raises(DatabaseUnavailable):
            svc.open_stream("w")
        assert "j1" not in _loaded(store.url).jobs

        flaky.down = None
        await _recovered(svc)
        await svc.stop_loops()
        # Written first, then carried out: the held assignment reaches the agent now.
        assert stream.get_nowait().assignment.job == "jobs/j1"
        stored = _loaded(store.url)
        assert stored.jobs["j1"].state == JobState.SCHEDULED
        assert stored.workers["w"].gpus[0].holder == ("j1", 1)
        # The client's retry with its request_id finds the one job.
        await svc.apply(JobSubmitted(T0, "j3", "alice", spec, "r1"))
        assert svc.core.requests[("alice", "r1")] == "j1" and "j3" not in svc.core.jobs

    asyncio.run(main())
    store.close()


def test_a_report_whose_write_failed_is_applied_once_when_resent(tmp_path: Path):
    store = _store(tmp_path)

    async def main() -> None:
        svc, flaky = await _service(store)
        spec = JobSpec(command=("train",))
        await svc.apply(JobSubmitted(T0, "j1", "alice", spec), SchedulePass(T0))
        await svc.apply(AttemptStarted(T0, "w", "j1", 1, 1))
        flaky.down = GONE
        log = AttemptLog(T0, "w", "j1", 1, 2, data="epoch 1\n")
        with pytest.raises(DatabaseUnavailable):
            await svc.apply(log)  # not acknowledged: the agent keeps it and resends
        with pytest.raises(DatabaseUnavailable):
            await svc.apply(log)  # the resend during the outage is refused
        flaky.down = None
        await _recovered(svc)
        await svc.stop_loops()
        # The resend after recovery: a duplicate by its sequence number, acknowledged.
        assert svc.core.is_duplicate(log)
        assert [(r.sequence, r.data) for r in store.logs("j1")] == [(2, "epoch 1\n")]
        assert _loaded(store.url).jobs["j1"].attempts[0].last_sequence == 2

    asyncio.run(main())
    store.close()


def test_a_write_that_fails_for_another_reason_also_holds_the_core(tmp_path: Path):
    store = _store(tmp_path)

    async def main() -> None:
        svc, flaky = await _service(store)
        flaky.down = RuntimeError("a bug in the store")
        with pytest.raises(RuntimeError):  # answered INTERNAL: a bug
            await svc.apply(JobSubmitted(T0, "j1", "alice", JobSpec(command=("x",))))
        with pytest.raises(DatabaseUnavailable, match="RuntimeError"):
            await svc.apply(JobSubmitted(T0, "j2", "alice", JobSpec(command=("x",))))
        flaky.down = None
        await _recovered(svc)
        await svc.stop_loops()
        assert set(_loaded(store.url).jobs) == {"j1"}

    asyncio.run(main())
    store.close()


def test_a_heartbeat_whose_write_failed_is_answered_and_written_later(tmp_path: Path):
    store = _store(tmp_path)

    async def main() -> None:
        svc, flaky = await _service(store)
        await svc.apply(Tick(T0 + svc.core.lease_ttl_s + 1))  # the worker goes OFFLINE
        flaky.down = GONE
        await svc.apply(Heartbeat(T0 + 20, "w"))  # ONLINE again: a change, held
        assert svc.database_down_for() is not None
        assert _loaded(store.url).workers["w"].state == "OFFLINE"
        flaky.down = None
        await _recovered(svc)
        await svc.stop_loops()
        assert _loaded(store.url).workers["w"].state == "ONLINE"

    asyncio.run(main())
    store.close()


def test_an_idle_broker_notices_an_outage_by_probing(tmp_path: Path):
    store = _store(tmp_path)

    async def main() -> None:
        svc, flaky = await _service(store)
        svc.db_probe_interval_s = 0.01
        flaky.down = GONE
        svc.start_loops(tick_interval_s=60.0)
        for _ in range(500):
            if svc.database_down_for() is not None:
                break
            await asyncio.sleep(0.01)
        assert svc.database_down_for() is not None
        flaky.down = None
        for _ in range(500):
            if svc.database_down_for() is None:
                break
            await asyncio.sleep(0.01)
        assert svc.database_down_for() is None
        await svc.stop_loops()

    asyncio.run(main())
    store.close()


# --- the mapping: real drivers, real faults ---------------------------------------------


def test_a_locked_sqlite_file_is_database_locked(tmp_path: Path):
    path = tmp_path / "broker.db"
    Store(f"sqlite:///{path}").close()
    store = Store(f"sqlite:///{path}?timeout=0.05", create=False)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(DatabaseUnavailable) as err:
            store.create_farm(FarmRow(id="f", display_name="farm", enrollment_token_sha256="x"))
        assert err.value.reason == "DATABASE_LOCKED"
        assert err.value.retry_after_s == 1.0
        with pytest.raises(DatabaseUnavailable):
            store.check_writable()
        assert store.api_keys() == []  # reads still work (WAL)
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.check_writable()
    store.close()


def test_a_read_only_sqlite_file_is_database_read_only(tmp_path: Path):
    path = tmp_path / "broker.db"
    Store(f"sqlite:///{path}").close()
    store = Store(f"sqlite:///file:{path}?mode=ro&uri=true", create=False)
    with pytest.raises(DatabaseUnavailable) as err:
        store.check_writable()  # reading would succeed: the probe writes and rolls back
    assert err.value.reason == "DATABASE_READ_ONLY"
    assert status_code(err.value) == grpc.StatusCode.UNAVAILABLE
    assert err.value.retry_after_s == 5.0
    store.close()


def test_errors_that_are_not_outages_are_not_mapped():
    integrity = sa_exc.IntegrityError("INSERT ...", {}, Exception("UNIQUE constraint failed"))
    assert database_error(integrity) is None
    assert database_error(sa_exc.ProgrammingError("SELECT", {}, Exception("syntax"))) is None
    lost = sa_exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    assert database_error(lost) is not None


class _Context:
    """Records what a servicer's context.abort was given."""

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        self.code, self.details, self.trailing = code, details, trailing
        raise grpc.aio.AbortError()


@pytest.mark.parametrize(
    ("reason", "retry_s"),
    [("DATABASE_UNAVAILABLE", 1.0), ("DATABASE_LOCKED", 1.0), ("DATABASE_READ_ONLY", 5.0)],
)
def test_a_database_fault_is_unavailable_with_retry_info(reason: str, retry_s: float):
    ctx = _Context()
    err = DatabaseUnavailable("the database is away", reason=reason, retry_after_s=retry_s)
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(abort_with(ctx, err))  # type: ignore[arg-type]
    assert ctx.code == grpc.StatusCode.UNAVAILABLE
    raw = dict(ctx.trailing)["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    assert status.code == code_pb2.UNAVAILABLE and status.message == "the database is away"
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
    assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
    assert (info.reason, info.domain) == (reason, ERROR_DOMAIN)
    assert retry.retry_delay.seconds == int(retry_s) and retry.retry_delay.nanos == 0
