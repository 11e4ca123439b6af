"""The ledger's SQL aggregates against the Python reference on PostgreSQL, where ``SUM`` of
a ``BIGINT`` is ``NUMERIC``: every figure must still come back as an exact ``int``.
(The SQLite run, with more examples, is tests/unit/test_ledger_sql.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from ledger_cases import Case, check_case, ledgers

from broker.store import Store


@pytest.fixture(scope="module")
def pg_store(postgres_url: str) -> Iterator[Store]:
    import uuid

    import sqlalchemy

    name = "t_" + uuid.uuid4().hex[:12]
    admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    store = Store(postgres_url.rsplit("/", 1)[0] + "/" + name)
    yield store
    store.close()
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=ledgers())
def test_sql_checks_agree_with_the_python_reference_on_postgres(pg_store: Store, case: Case):
    check_case(pg_store, case)


def test_big_sums_stay_exact_integers_on_postgres(pg_store: Store):
    from broker.economics import LedgerEntry
    from broker.ledger import AttemptCharge

    big = 4 * 10**18  # a SUM of two overflows int64: NUMERIC keeps it exact
    legs = [
        LedgerEntry("t1", "farm:f", big, "payout", "a", 1, 1.0),
        LedgerEntry("t2", "farm:f", big, "payout", "a", 2, 1.0),
    ]
    check_case(pg_store, Case(legs, [AttemptCharge("a", 1, "RUNNING", 0)]))
    assert pg_store.balances() == {"farm:f": 2 * big}
