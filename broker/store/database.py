"""The broker's database: :class:`Store`, its connection, and what its faults mean.

Every query goes through :meth:`Store._session`, where a database fault becomes
:class:`~broker.errors.DatabaseUnavailable` (:func:`database_error`): the one form in which
faults leave the store.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import delete, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, create_engine, select

from broker.core import BrokerCore
from broker.earnings import Settled
from broker.errors import AlreadyExists, DatabaseUnavailable, NotFound
from broker.events import Writes
from broker.metrics_tally import HistoryTotals
from broker.records import StoredState
from broker.store import ledger_sql
from broker.store.load import read_state
from broker.store.reads import JobReads
from broker.store.rows import (
    ApiKeyRow,
    CurtailmentRow,
    FarmRow,
    LogRow,
    MetricSnapshotRow,
    WorkerCredentialRow,
)
from broker.store.save import Writer

__all__ = [
    "PG_CONNECT_TIMEOUT_S",
    "Store",
    "database_error",
    "default_db_url",
    "local_database",
]


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
    def _on_connect(dbapi_conn: Any, _record: object) -> None:
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


class Store(JobReads):
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
        self._written = Writer()
        # A snapshot that could not be taken (deleted) at start: the first write deletes it,
        # so that a crash after this broker's writes cannot leave stale totals behind.
        self._stale_snapshot = False

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

    def add_curtailment(self, row: CurtailmentRow) -> CurtailmentRow:
        """Insert a curtailment window."""
        with self._session() as s:
            s.add(row)
            s.commit()
            s.refresh(row)
            return row

    def cancel_curtailment(self, curtailment_id: str, when: float) -> None:
        """Mark a window cancelled at ``when``; NotFound when there is none."""
        with self._session() as s:
            row = s.get(CurtailmentRow, curtailment_id)
            if row is None:
                raise NotFound(
                    f"curtailment {curtailment_id} not found",
                    metadata={"curtailment": curtailment_id},
                )
            row.cancel_time = when
            s.add(row)
            s.commit()

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
        """Write what ``writes`` names in one transaction: its jobs and workers as the core
        holds them now (read through ``core.job`` and ``core.worker``), its ledger entries
        and its log lines; only the rows that changed (``broker.store.save``)."""
        with self._session() as s:
            workers, jobs = self._written.write(s, core, writes)
            if self._stale_snapshot:
                s.exec(delete(MetricSnapshotRow))
            s.commit()
        self._stale_snapshot = False
        self._written.committed(core, workers, jobs)

    def load(self, core: BrokerCore, now: float | None = None) -> None:
        """Rebuild an empty core from the database (``core.restore``); every worker gets a
        fresh lease from ``now`` (a grace period to reconnect)."""
        core.restore(self.read_state(), time.time() if now is None else now)

    def read_state(self) -> StoredState:
        """The core's records as the database holds them (``broker.store.load``)."""
        with self._session() as s:
            state, written = read_state(s)
        self._written.workers.update(written)
        return state

    # --- the ledger (SQL aggregates: the broker holds no ledger in memory) ----------

    def ledger_check(self) -> tuple[list[str], dict[str, int]]:
        """(discrepancies, summary figures) of the ledger (``broker.ledger.verify_ledger``),
        computed as SQL aggregates (``broker.store.ledger_sql.ledger_check``)."""
        with self._session() as s:
            return ledger_sql.ledger_check(s.connection())

    def balances(self, accounts: list[str] | None = None) -> dict[str, int]:
        """account -> balance in micro-dollars (``broker.store.ledger_sql.balances``)."""
        with self._session() as s:
            return ledger_sql.balances(s.connection(), accounts)

    def ledger_totals(self) -> ledger_sql.LedgerTotals:
        """The ledger's sum and each farm's payouts (what the metrics start from)."""
        with self._session() as s:
            return ledger_sql.ledger_totals(s.connection())

    def history_totals(self) -> HistoryTotals:
        """What the broker's metrics start from (``broker.store.ledger_sql.history_totals``):
        aggregates over the ledger, finished jobs, SLA events and settled attempts."""
        with self._session() as s:
            return ledger_sql.history_totals(s.connection())

    def leave_metric_snapshot(self, figures_json: str, now: float) -> None:
        """Keep the metrics' history totals for the next broker (at a clean stop, after
        the last write; ``MetricSnapshotRow``)."""
        with self._session() as s:
            s.merge(MetricSnapshotRow(id=1, figures_json=figures_json, taken_at=now))
            s.commit()

    def take_metric_snapshot(self) -> str | None:
        """The totals a cleanly stopped broker left, removed in the same transaction (so a
        broker that crashes after this leaves none); None when there is none."""
        self._stale_snapshot = True  # until it is gone
        with self._session() as s:
            row = s.get(MetricSnapshotRow, 1)
            if row is not None:
                figures: str | None = row.figures_json
                s.delete(row)
                s.commit()
            else:
                figures = None
        self._stale_snapshot = False
        return figures

    def settled(self, *, farm_id: str = "", since: float | None = None) -> Iterator[Settled]:
        """Settled attempts that ended at or after ``since`` (of ``farm_id``'s workers when
        set) with their payouts, streamed (``broker.store.ledger_sql.settled_attempts``):
        what ``broker.earnings`` reads in the broker."""
        with self._session() as s:
            yield from ledger_sql.settled_attempts(s.connection(), farm_id=farm_id, since=since)

    def logs(self, job_id: str, after_id: int = 0) -> list[LogRow]:
        """Log rows of a job with id > after_id, oldest first."""
        with self._session() as s:
            q = (
                select(LogRow)
                .where(LogRow.job_id == job_id, col(LogRow.id) > after_id)
                .order_by(col(LogRow.id))
            )
            return list(s.exec(q).all())
