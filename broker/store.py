"""Persistence on SQLModel: SQLite by default, any SQLAlchemy URL with ``--db``.

The store is the source of truth. The shell saves, in one transaction per
batch, what the core's commands name (``broker.events.Writes``: the jobs and workers
to write, ledger entries, log lines); a restarted broker rebuilds its core with
:meth:`Store.load`, which reads the records (:meth:`Store.read_state`) and hands them
to ``BrokerCore.restore``.
Rows here are store models only: the core never sees them (STYLE.md 9).

Database faults leave the store in one form only: :class:`~broker.errors.DatabaseUnavailable`
(gRPC ``UNAVAILABLE`` with RetryInfo), mapped from SQLAlchemy's errors by
:func:`database_error` in :meth:`Store._session`, through which every query goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import BigInteger, UniqueConstraint, delete, event, func, insert, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from broker.core import BrokerCore
from broker.economics import FarmTerms, LedgerEntry, TariffWindow
from broker.errors import AlreadyExists, DatabaseUnavailable, NotFound, StaleWriter
from broker.events import Writes
from broker.ledger import AttemptCharge
from broker.model import (
    TERMINAL_JOB_STATES,
    AttemptState,
    GpuInfo,
    JobSpec,
    JobState,
    SlaKind,
    Tier,
    WorkerState,
)
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

__all__ = [
    "ApiKeyRow",
    "FarmRow",
    "LedgerRow",
    "LogRow",
    "Store",
    "database_error",
    "default_db_url",
    "farm_terms",
]


def _big() -> int:
    """An int64 column (money in micro-dollars, energy in joules): BIGINT on PostgreSQL."""
    return Field(default=0, sa_type=BigInteger)  # type: ignore[no-any-return]


class FarmRow(SQLModel, table=True):
    """A farm; the enrollment token is stored hashed."""

    __tablename__ = "farms"
    id: str = Field(primary_key=True)
    display_name: str = Field(unique=True, index=True)
    region: str = ""
    tariff_micros_per_kwh: int = _big()
    pue_permille: int = 1000
    enrollment_token_sha256: str = Field(index=True)
    create_time: float = 0.0
    broker_fee_permille: int = 100
    margin_micros_per_gpu_hour: int = _big()
    mining_json: str = "{}"  # GPU model -> micro-dollars per kWh
    asks_json: str = "{}"  # GPU model -> micro-dollars per GPU-hour
    tariff_windows_json: str = "[]"  # [[start_hour, end_hour, micros_per_kwh], ...]


def farm_terms(row: FarmRow) -> FarmTerms:
    """The economics of a farm row, as the core uses them."""
    return FarmTerms(
        farm_id=row.id,
        tariff_micros_per_kwh=row.tariff_micros_per_kwh,
        pue_permille=row.pue_permille,
        broker_fee_permille=row.broker_fee_permille,
        margin_micros_per_gpu_hour=row.margin_micros_per_gpu_hour,
        mining_micros_per_kwh=tuple(sorted(json.loads(row.mining_json).items())),
        ask_micros_per_gpu_hour=tuple(sorted(json.loads(row.asks_json).items())),
        tariff_windows=tuple(TariffWindow(*w) for w in json.loads(row.tariff_windows_json)),
    )


class WorkerRow(SQLModel, table=True):
    """A worker (rig)."""

    __tablename__ = "workers"
    id: str = Field(primary_key=True)
    farm_id: str = Field(foreign_key="farms.id", index=True)
    hostname: str
    agent_version: str = ""
    state: str
    last_heartbeat: float = 0.0
    metrics_address: str = ""
    first_seen: float = 0.0
    offline_since: float | None = None
    reliability_json: str = "[[], []]"  # [offline spans, attempt outcomes] in the window


class WorkerCredentialRow(SQLModel, table=True):
    """The sha256 of a worker's credential (the credential itself is never stored)."""

    __tablename__ = "worker_credentials"
    worker_id: str = Field(primary_key=True)
    credential_sha256: str = Field(index=True)


class GpuRow(SQLModel, table=True):
    """A GPU of a worker and the attempt that holds it."""

    __tablename__ = "gpus"
    worker_id: str = Field(primary_key=True, foreign_key="workers.id")
    index: int = Field(primary_key=True)
    uuid: str = ""
    model: str
    vram_mb: int = 0
    power_limit_watts: int = 0
    price_micros_per_gpu_hour: int = _big()
    pcie_link_width: int = 16
    holder_job_id: str | None = None
    holder_attempt: int | None = None


class JobRow(SQLModel, table=True):
    """A job; its spec is stored as JSON."""

    __tablename__ = "jobs"
    id: str = Field(primary_key=True)
    owner: str = Field(index=True)
    request_id: str = Field(default="", index=True)
    spec_json: str
    state: str = Field(index=True)
    create_time: float = Field(index=True)
    update_time: float = 0.0
    status_message: str = ""
    exit_code: int = 0
    pending_reasons_json: str = "[]"
    credit_micros: int = _big()
    checkpoint_sha256: str = ""
    checkpoint_time: float | None = None


class AttemptRow(SQLModel, table=True):
    """One placement of a job."""

    __tablename__ = "attempts"
    job_id: str = Field(primary_key=True, foreign_key="jobs.id")
    number: int = Field(primary_key=True)
    worker_id: str = Field(index=True)
    gpu_indices_json: str
    price_micros_per_gpu_hour: int = _big()
    state: str
    schedule_time: float
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    energy_joules: int = _big()
    last_sequence: int = _big()
    message: str = ""
    charge_micros: int = _big()
    settled: bool = False
    last_checkpoint_time: float | None = None
    setup_ms: int = _big()
    output_json: str = ""  # {"sha256", "size_bytes", "time", "over_limit", "message"} or ""


class JobEventRow(SQLModel, table=True):
    """One state transition of a job (its history)."""

    __tablename__ = "job_events"
    job_id: str = Field(primary_key=True, foreign_key="jobs.id")
    idx: int = Field(primary_key=True)
    time: float
    from_state: str | None = None
    to_state: str
    reason: str = ""


class SlaEventRow(SQLModel, table=True):
    """One SLA event of a job."""

    __tablename__ = "sla_events"
    job_id: str = Field(primary_key=True, foreign_key="jobs.id")
    idx: int = Field(primary_key=True)
    kind: str = Field(index=True)
    time: float
    attempt: int
    seconds: int = _big()
    credit_micros: int = _big()
    detail: str = ""


class LedgerRow(SQLModel, table=True):
    """One leg of a double-entry transaction; a transaction's legs sum to zero.

    (txn, account) is unique, so the database itself refuses a second settlement.
    """

    __tablename__ = "ledger"
    __table_args__ = (UniqueConstraint("txn", "account", name="uq_ledger_txn_account"),)
    id: int | None = Field(default=None, primary_key=True)
    txn: str = Field(index=True)
    account: str = Field(index=True)
    amount_micros: int = _big()
    kind: str
    job_id: str = Field(index=True)
    attempt: int
    time: float = Field(index=True)


class ApiKeyRow(SQLModel, table=True):
    """An API key; only the sha256 of the secret is stored."""

    __tablename__ = "api_keys"
    id: str = Field(primary_key=True)
    key_sha256: str = Field(unique=True, index=True)
    role: str
    principal: str = Field(index=True)
    farm_id: str = ""
    create_time: float = 0.0
    revoked: bool = False


class LeaderRow(SQLModel, table=True):
    """Which broker replica leads (one row, id 1; see ``broker/replica.py``)."""

    __tablename__ = "broker_leader"
    id: int = Field(default=1, primary_key=True)
    replica: str
    address: str
    epoch: int = _big()
    since: float = 0.0


class LogRow(SQLModel, table=True):
    """A piece of a job's output."""

    __tablename__ = "job_logs"
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True)
    attempt: int
    sequence: int = _big()
    data: str


def local_database(home: Path | str = ".rigshift") -> Path | None:
    """The SQLite database a broker in this directory used: ``HOME/broker.db``, else the
    last ``rigshift demo``'s (``HOME/demo/broker/broker.db``); None when there is neither."""
    for path in (Path(home) / "broker.db", Path(home) / "demo" / "broker" / "broker.db"):
        if path.is_file():
            return path
    return None


def default_db_url(home: Path | str = ".rigshift") -> str:
    """The embedded default: a SQLite file under ``.rigshift/`` in the working directory."""
    path = Path(home) / "broker.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()


PG_CONNECT_TIMEOUT_S = 5
"""How long a new PostgreSQL connection may take (unless the URL sets ``connect_timeout``)."""

_UNREACHABLE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # no pooled connection came free
    sa_exc.DisconnectionError,
)


def database_error(err: BaseException) -> DatabaseUnavailable | None:
    """The DatabaseUnavailable that a SQLAlchemy error stands for; None for anything else
    (an IntegrityError or ProgrammingError is a bug, not an outage).

    - read-only (SQLite ``SQLITE_READONLY*``, PostgreSQL SQLSTATE 25006 on a standby):
      ``DATABASE_READ_ONLY``, retry in 5 s (an operator has to act; the broker resumes
      by itself once the database takes writes again);
    - locked beyond the busy timeout (SQLite ``SQLITE_BUSY``/``SQLITE_LOCKED``):
      ``DATABASE_LOCKED``, retry in 1 s;
    - unreachable, connection lost or refused, server shutting down, pool exhausted
      (``OperationalError``, ``InterfaceError``, any ``DBAPIError`` that invalidated its
      connection): ``DATABASE_UNAVAILABLE``, retry in 1 s.
    """
    orig = getattr(err, "orig", None)
    sqlite_name = str(getattr(orig, "sqlite_errorname", "") or "")
    sqlstate = str(getattr(orig, "sqlstate", "") or "")
    lines = str(orig if orig is not None else err).strip().splitlines()
    detail = (lines[0] if lines else type(err).__name__)[:200]
    if sqlite_name.startswith("SQLITE_READONLY") or sqlstate == "25006":
        return DatabaseUnavailable(
            f"the broker's database is read-only ({detail}); changes are refused until an "
            "operator makes it writable again",
            reason="DATABASE_READ_ONLY",
            retry_after_s=5.0,
        )
    if sqlite_name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return DatabaseUnavailable(
            f"the broker's database is locked by another process ({detail})",
            reason="DATABASE_LOCKED",
        )
    invalidated = isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated
    if isinstance(err, _UNREACHABLE) or invalidated:
        return DatabaseUnavailable(f"the broker's database cannot be reached ({detail})")
    return None


class Store:
    """All database access of the broker."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        if url.startswith("sqlite"):
            self.engine = create_engine(url, connect_args={"check_same_thread": False})
            _sqlite_pragmas(self.engine)
        elif url.startswith("postgresql") and "connect_timeout" not in url:
            self.engine = create_engine(
                url, pool_pre_ping=True, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S}
            )
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        if create:
            from broker.schema import ensure_schema

            with self._faults():
                ensure_schema(self.engine)
        # What this store last committed per worker and per unfinished job (see save()).
        self._workers_written: dict[str, _WorkerWritten] = {}
        self._jobs_written: dict[str, _JobWritten] = {}

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    @contextlib.contextmanager
    def _faults(self) -> Iterator[None]:
        """Turn a database fault into DatabaseUnavailable (the one place that does)."""
        try:
            yield
        except sa_exc.SQLAlchemyError as err:
            mapped = database_error(err)
            if mapped is None:
                raise
            if mapped.reason == "DATABASE_READ_ONLY":
                # SQLite keeps a file it opened read-only read-only for the connection's
                # life: drop the pooled connections, so a later try opens the file again.
                self.engine.dispose()
            raise mapped from err

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        with self._faults(), Session(self.engine) as s:
            yield s

    def check_writable(self) -> None:
        """Raise DatabaseUnavailable unless a write could commit now; nothing is written.

        SQLite: write a row under the write lock and roll it back (a locked file, or one
        opened read-only, fails here; merely reading would not tell). PostgreSQL: a round
        trip to a server that is not read-only (a standby after a failover is).
        """
        with self._session() as s:
            conn = s.connection()
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql(
                    "INSERT INTO broker_leader (id, replica, address, epoch, since) "
                    "VALUES (-1, '', '', 0, 0)"
                )
            elif conn.dialect.name == "postgresql":
                if conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "on":
                    raise DatabaseUnavailable(
                        "the broker's database is read-only (a standby?)",
                        reason="DATABASE_READ_ONLY",
                        retry_after_s=5.0,
                    )
            else:
                conn.exec_driver_sql("SELECT 1")
            s.rollback()

    # --- farms ----------------------------------------------------------------

    def create_farm(self, row: FarmRow) -> FarmRow:
        """Insert a farm; AlreadyExists when the display name is taken."""
        with self._session() as s:
            taken = s.exec(select(FarmRow).where(FarmRow.display_name == row.display_name)).first()
            if taken is not None:
                raise AlreadyExists(
                    f"a farm named {row.display_name!r} exists already",
                    reason="FARM_EXISTS",
                    metadata={"farm": f"farms/{taken.id}"},
                )
            s.add(row)
            s.commit()
            s.refresh(row)
            return row

    def get_farm(self, farm_id: str) -> FarmRow:
        """The farm, or NotFound."""
        with self._session() as s:
            row = s.get(FarmRow, farm_id)
            if row is None:
                raise NotFound(f"farm {farm_id} not found", metadata={"farm": farm_id})
            return row

    def update_farm(self, farm_id: str, changes: dict[str, object]) -> FarmRow:
        """Set columns of a farm; NotFound / AlreadyExists as for create."""
        with self._session() as s:
            row = s.get(FarmRow, farm_id)
            if row is None:
                raise NotFound(f"farm {farm_id} not found", metadata={"farm": farm_id})
            name = changes.get("display_name")
            if name is not None and name != row.display_name:
                q = select(FarmRow).where(FarmRow.display_name == name)
                if s.exec(q).first() is not None:
                    raise AlreadyExists(
                        f"a farm named {name!r} exists already", reason="FARM_EXISTS"
                    )
            for key, value in changes.items():
                setattr(row, key, value)
            s.add(row)
            s.commit()
            s.refresh(row)
            return row

    def farm_by_token(self, token_sha256: str) -> FarmRow | None:
        """The farm whose enrollment token hashes to this, if any."""
        with self._session() as s:
            q = select(FarmRow).where(FarmRow.enrollment_token_sha256 == token_sha256)
            return s.exec(q).first()

    # --- credentials ------------------------------------------------------------

    def add_api_key(self, row: ApiKeyRow) -> ApiKeyRow:
        """Insert an API key row."""
        with self._session() as s:
            s.add(row)
            s.commit()
            s.refresh(row)
            return row

    def api_keys(self) -> list[ApiKeyRow]:
        """Every API key, oldest first."""
        with self._session() as s:
            return list(s.exec(select(ApiKeyRow).order_by(col(ApiKeyRow.create_time))))

    def revoke_api_key(self, key_id: str) -> ApiKeyRow:
        """Mark a key revoked; NotFound when unknown."""
        with self._session() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                raise NotFound(f"API key {key_id} not found", metadata={"api_key": key_id})
            row.revoked = True
            s.add(row)
            s.commit()
            s.refresh(row)
            return row

    def set_worker_credential(self, worker_id: str, credential_sha256: str) -> None:
        """Store (or replace) a worker's credential hash."""
        with self._session() as s:
            s.merge(WorkerCredentialRow(worker_id=worker_id, credential_sha256=credential_sha256))
            s.commit()

    def worker_credentials(self) -> dict[str, str]:
        """worker_id -> credential sha256, for every worker."""
        with self._session() as s:
            rows = s.exec(select(WorkerCredentialRow)).all()
            return {r.worker_id: r.credential_sha256 for r in rows}

    # --- the core's state -------------------------------------------------------

    def save(self, core: BrokerCore, writes: Writes) -> None:
        """Write what ``writes`` names, atomically: its jobs and workers as the core holds
        them now (read through ``core.job`` and ``core.worker``), its ledger entries and
        its log lines.

        The first write of a worker or job by this store merges (reads the row, then writes
        it); after that the store remembers what it committed and writes only the rows that
        changed, without reading first (a bind touches one GPU row, not all of them).
        """
        workers_written: dict[str, _WorkerWritten] = {}
        jobs_written: dict[str, _JobWritten] = {}
        with self._session() as s:
            # Workers first: attempts and GPU holders refer to them.
            for worker_id in sorted(writes.worker_ids):
                workers_written[worker_id] = self._save_worker(s, core.worker(worker_id))
            for job_id in sorted(writes.job_ids):
                jobs_written[job_id] = self._save_job(s, core.job(job_id))
            for e in writes.ledger:
                s.add(
                    LedgerRow(
                        txn=e.txn,
                        account=e.account,
                        amount_micros=e.amount_micros,
                        kind=e.kind,
                        job_id=e.job_id,
                        attempt=e.attempt,
                        time=e.time,
                    )
                )
            for log in writes.logs:
                s.add(
                    LogRow(
                        job_id=log.job_id, attempt=log.attempt, sequence=log.sequence, data=log.data
                    )
                )
            s.commit()
        # Remember only what is committed: a failed save leaves the memory as it was.
        self._workers_written.update(workers_written)
        for job_id, written in jobs_written.items():
            job = core.job(job_id)
            if job.state in TERMINAL_JOB_STATES and not (job.current and job.current.live):
                self._jobs_written.pop(job_id, None)  # settled: rarely written again, merge then
            else:
                self._jobs_written[job_id] = written

    def _save_worker(self, s: Session, w: Worker) -> _WorkerWritten:
        row = _worker_values(w)
        gpus = {index: _gpu_values(w.worker_id, gpu) for index, gpu in w.gpus.items()}
        written = _WorkerWritten(
            tuple(row.values()), {i: tuple(g.values()) for i, g in gpus.items()}
        )
        before = self._workers_written.get(w.worker_id)
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
            s.exec(update(WorkerRow), params=[row])
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
            was = before.gpus[index][_HOLDER_AT : _HOLDER_AT + 2]
            if was == written.gpus[index][_HOLDER_AT : _HOLDER_AT + 2]:
                changed.append(values)
            else:
                _bind_if_unchanged(s, values, was)
        if fresh:
            s.exec(insert(GpuRow), params=fresh)
        if changed:
            s.exec(update(GpuRow), params=changed)
        return written

    def _save_job(self, s: Session, job: Job) -> _JobWritten:
        row = _job_values(job)
        attempts = {a.number: _attempt_values(job.job_id, a) for a in job.attempts}
        written = _JobWritten(
            tuple(row.values()),
            {n: tuple(a.values()) for n, a in attempts.items()},
            len(job.history),
            len(job.sla_events),
        )
        before = self._jobs_written.get(job.job_id)
        if before is None:
            s.merge(JobRow(**row))
            for values in attempts.values():
                s.merge(AttemptRow(**values))
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
            s.exec(update(JobRow), params=[row])
        fresh = [values for n, values in attempts.items() if n not in before.attempts]
        changed = [
            values
            for n, values in attempts.items()
            if n in before.attempts and written.attempts[n] != before.attempts[n]
        ]
        if fresh:
            s.exec(insert(AttemptRow), params=fresh)
        if changed:
            s.exec(update(AttemptRow), params=changed)
        history = _history_values(job, before.history)
        if history:
            s.exec(insert(JobEventRow), params=history)
        sla = _sla_values(job, before.sla_events)
        if sla:
            s.exec(insert(SlaEventRow), params=sla)
        return written

    def load(self, core: BrokerCore, now: float | None = None) -> None:
        """Rebuild an empty core from the database (``core.restore``); every worker gets a
        fresh lease from ``now`` (a grace period to reconnect)."""
        core.restore(self.read_state(), time.time() if now is None else now)

    def read_state(self) -> StoredState:
        """The core's records as the database holds them."""
        with self._session() as s:
            farms = tuple(farm_terms(farm) for farm in s.exec(select(FarmRow)))
            ledger = tuple(
                LedgerEntry(r.txn, r.account, r.amount_micros, r.kind, r.job_id, r.attempt, r.time)
                for r in s.exec(select(LedgerRow).order_by(col(LedgerRow.id)))
            )
            workers: list[Worker] = []
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
                )
                gpus.setdefault(g.worker_id, {})[g.index] = Gpu(info, holder)  # type: ignore[arg-type]
                gpu_rows.setdefault(g.worker_id, {})[g.index] = tuple(
                    getattr(g, k) for k in _GPU_KEYS
                )
            for w in s.exec(select(WorkerRow)):
                # What the database holds is what this store "last wrote": the first bind
                # after a load (a failover) is then compare-and-set too. The row part is
                # left empty, so the worker row is simply written again.
                self._workers_written[w.id] = _WorkerWritten((), gpu_rows.get(w.id, {}))
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
                        first_seen=w.first_seen,
                        offline_since=w.offline_since,
                        offline_log=[tuple(x) for x in json.loads(w.reliability_json)[0]],  # type: ignore[misc]
                        outcomes=[tuple(x) for x in json.loads(w.reliability_json)[1]],  # type: ignore[misc]
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
                    SlaEvent(
                        SlaKind(r.kind), r.time, r.attempt, r.seconds, r.credit_micros, r.detail
                    )
                )
            for j in s.exec(select(JobRow).order_by(col(JobRow.create_time))):
                job = Job(
                    j.id,
                    j.owner,
                    _spec_from_json(j.spec_json),
                    j.create_time,
                    request_id=j.request_id,
                    state=JobState(j.state),
                    update_time=j.update_time,
                    attempts=attempts.get(j.id, []),
                    history=history.get(j.id, []),
                    pending_reasons=tuple(
                        Rejection(*r) for r in json.loads(j.pending_reasons_json)
                    ),
                    status_message=j.status_message,
                    exit_code=j.exit_code,
                    sla_events=sla.get(j.id, []),
                    credit_micros=j.credit_micros,
                    checkpoint_sha256=j.checkpoint_sha256,
                    checkpoint_time=j.checkpoint_time,
                )
                jobs.append(job)
        return StoredState(farms, tuple(workers), tuple(jobs), ledger)

    def ledger_rows(self) -> tuple[list[LedgerRow], list[AttemptCharge]]:
        """Every ledger row, and every attempt as the ledger checker reads it
        (``broker.ledger.verify_ledger``)."""
        with self._session() as s:
            legs = list(s.exec(select(LedgerRow).order_by(col(LedgerRow.id))))
            attempts = [
                AttemptCharge(a.job_id, a.number, a.state, a.charge_micros)
                for a in s.exec(select(AttemptRow))
            ]
        return legs, attempts

    def logs(self, job_id: str, after_id: int = 0) -> list[LogRow]:
        """Log rows of a job with id > after_id, oldest first."""
        with self._session() as s:
            q = (
                select(LogRow)
                .where(LogRow.job_id == job_id, col(LogRow.id) > after_id)
                .order_by(col(LogRow.id))
            )
            return list(s.exec(q).all())


class _WorkerWritten(NamedTuple):
    """The values of a worker's row and of its GPU rows as this store last committed them."""

    row: tuple[object, ...]
    gpus: dict[int, tuple[object, ...]]


class _JobWritten(NamedTuple):
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
        "first_seen": w.first_seen,
        "offline_since": w.offline_since,
        "reliability_json": json.dumps([w.offline_log, w.outcomes]),
    }


def _bind_if_unchanged(s: Session, values: dict[str, Any], was: tuple[object, ...]) -> None:
    """Change a GPU's holder only if the row still holds what this store last wrote.

    Compare-and-set on the row: with broker replicas, a second writer that believed
    it led (for a moment, during a failover) finds the row changed and gets
    StaleWriter, its transaction rolls back, and a GPU is never bound twice.
    """
    stmt = (
        update(GpuRow)
        .where(
            col(GpuRow.worker_id) == values["worker_id"],
            col(GpuRow.index) == values["index"],
            col(GpuRow.holder_job_id).is_not_distinct_from(was[0]),
            col(GpuRow.holder_attempt).is_not_distinct_from(was[1]),
        )
        .values(**values)
    )
    if s.execute(stmt).rowcount != 1:  # type: ignore[attr-defined]
        raise StaleWriter(
            f"GPU {values['index']} of workers/{values['worker_id']} was changed by another "
            "broker; this one stops writing",
            metadata={"worker": str(values["worker_id"]), "gpu_index": str(values["index"])},
        )


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
    }


#: The columns of ``_gpu_values`` in order, and where holder_job_id and holder_attempt sit.
_GPU_KEYS = tuple(_gpu_values("", Gpu(GpuInfo(0, "", "", 0), None)))
_HOLDER_AT = _GPU_KEYS.index("holder_job_id")


def _job_values(job: Job) -> dict[str, Any]:
    return {
        "id": job.job_id,
        "owner": job.owner,
        "request_id": job.request_id,
        "spec_json": _spec_to_json(job.spec),
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


def _spec_to_json(spec: JobSpec) -> str:
    return json.dumps(
        {
            "command": list(spec.command),
            "env": [list(kv) for kv in spec.env],
            "gpu_count": spec.gpu_count,
            "gpu_model": spec.gpu_model,
            "min_vram_mb": spec.min_vram_mb,
            "max_price_micros_per_gpu_hour": spec.max_price_micros_per_gpu_hour,
            "max_duration_seconds": spec.max_duration_seconds,
            "working_dir_sha256": spec.working_dir_sha256,
            "max_attempts": spec.max_attempts,
            "display_name": spec.display_name,
            "tier": spec.tier.value,
            "python_requirements": spec.python_requirements,
            "requirements_sha256": spec.requirements_sha256,
            "inputs": [list(kv) for kv in spec.inputs],
        },
        sort_keys=True,
    )


def _spec_from_json(text: str) -> JobSpec:
    d = json.loads(text)
    d["command"] = tuple(d["command"])
    d["env"] = tuple((k, v) for k, v in d["env"])
    d["tier"] = Tier(d.get("tier", "GUARANTEED"))
    d["inputs"] = tuple((k, v) for k, v in d.get("inputs", ()))
    return JobSpec(**d)
