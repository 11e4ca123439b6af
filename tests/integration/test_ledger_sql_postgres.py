"""The ledger's SQL aggregates against the Python reference on PostgreSQL, where ``SUM`` of
a ``BIGINT`` is ``NUMERIC``: every figure must still come back as an exact ``int``. And
earnings and the metrics' starting totals read from PostgreSQL equal the core's. (The
SQLite runs, with more examples: tests/unit/test_ledger_sql.py, test_earnings_sql.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from history_cases import T0, figures, history, jobs, stored, troubles
from hypothesis import HealthCheck, Phase, given, settings
from ledger_cases import Case, check_case, ledgers

from broker.core import BrokerCore
from broker.earnings import earnings
from broker.metrics_tally import Tally
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


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # examples are slow to shrink
)
@given(plan=jobs)
def test_earnings_and_metric_totals_from_postgres_equal_the_cores(pg_store: Store, plan):
    core = BrokerCore(lease_ttl_s=1e9)
    end, cmds = history(core, plan)
    cmds += troubles(core, end + 1)
    store = stored(core, cmds, pg_store.url, create=False)
    try:
        for group_by in ("farm", "worker", "gpu"):
            for since in (0.0, T0 + 1):
                kw = dict(since=since, group_by=group_by, now=end + 5_000)
                assert earnings(core, source=store, **kw) == earnings(core, **kw)
        restored = Tally(core, store.history_totals())
        pure = Tally(core)
        assert figures(restored) == figures(pure)
        assert pure.curtailed == {("fa", "spot"): 1}  # the tier read from the spec's JSON
        for value in (restored.ledger_sum, *restored.payouts.values(), *restored.energy.values()):
            assert type(value) is int
    finally:
        store.close()
