"""Persistence on SQLModel: SQLite by default, any SQLAlchemy URL with ``--db``.

The store is the source of truth. The shell saves, in one transaction per batch, what
the core's commands name (``broker.events.Writes``: the jobs and workers to write, ledger
entries, log lines); a restarted broker rebuilds its core with :meth:`Store.load`, which
reads the records (:meth:`Store.read_state`) and hands them to ``BrokerCore.restore``.
Rows are store models only: the core never sees them (STYLE.md 9).

* ``rows`` -- the tables;
* ``save`` -- writing the core's records, only the rows that changed;
* ``load`` -- reading the live work back (a restart);
* ``reads`` -- reading finished jobs, which the core lets go of once stored (GetJob,
  ListJobs' pages, request ids, artifact references);
* ``ledger_sql`` -- the ledger as SQL aggregates (balances, the settled-once checks,
  earnings' settled attempts): the broker holds no ledger in memory;
* ``database`` -- :class:`Store` (connection, farms, keys, credentials, logs) and
  :func:`database_error`, the one place where a database fault becomes
  :class:`~broker.errors.DatabaseUnavailable` (gRPC ``UNAVAILABLE`` with RetryInfo).
"""

from broker.store.database import (
    PG_CONNECT_TIMEOUT_S,
    Store,
    database_error,
    default_db_url,
    local_database,
)
from broker.store.rows import (
    ApiKeyRow,
    AttemptRow,
    CurtailmentRow,
    FarmRow,
    GpuRow,
    JobEventRow,
    JobRow,
    LeaderRow,
    LedgerRow,
    LogRow,
    SlaEventRow,
    WorkerCredentialRow,
    WorkerRow,
    farm_terms,
)

__all__ = [
    "PG_CONNECT_TIMEOUT_S",
    "ApiKeyRow",
    "AttemptRow",
    "CurtailmentRow",
    "FarmRow",
    "GpuRow",
    "JobEventRow",
    "JobRow",
    "LeaderRow",
    "LedgerRow",
    "LogRow",
    "SlaEventRow",
    "Store",
    "WorkerCredentialRow",
    "WorkerRow",
    "database_error",
    "default_db_url",
    "farm_terms",
    "local_database",
]
