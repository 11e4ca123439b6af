"""The ledger's SQL aggregates (``broker.store.ledger_sql``) against the Python reference
(``broker.ledger.ledger_problems``) on random, often broken, ledgers in a SQLite file.
The same cases run on PostgreSQL in tests/integration/test_ledger_sql_postgres.py."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from ledger_cases import Case, check_case, ledgers

from broker.ledger import verify_ledger
from broker.store import Store
from broker.store.ledger_sql import _int


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    path: Path = tmp_path_factory.mktemp("ledger") / "broker.db"
    s = Store(f"sqlite:///{path}")
    yield s
    s.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=ledgers(non_integers=True))
def test_sql_checks_agree_with_the_python_reference_on_sqlite(store: Store, case: Case):
    check_case(store, case)


def test_a_clean_ledger_has_no_problem_and_every_broken_kind_is_found(store: Store):
    from broker.economics import LedgerEntry
    from broker.ledger import AttemptCharge

    def settle(txn, job, n, charge):
        return [
            LedgerEntry(txn, f"client:{job}", -charge, "charge", job, n, 1.0),
            LedgerEntry(txn, "farm:f", charge, "payout", job, n, 1.0),
        ]

    attempts = [
        AttemptCharge("j1", 1, "SUCCEEDED", 100),
        AttemptCharge("j2", 1, "FAILED", 50),
        AttemptCharge("j3", 1, "RUNNING", 0),
        AttemptCharge("j4", 1, "LOST", 7),
    ]
    clean = Case(
        settle("t1", "j1", 1, 100) + settle("t2", "j2", 1, 50) + settle("t4", "j4", 1, 7), attempts
    )
    check_case(store, clean)
    assert verify_ledger(store) == (
        [],
        {
            "entries": 6,
            "transactions": 3,
            "settled_attempts": 3,
            "client_charges_micros": 157,
            "balance_micros": 0,
        },
    )
    broken = Case(
        settle("t1", "j1", 1, 100)
        + settle("t1b", "j1", 1, 100)  # twice
        + settle("t2", "j2", 1, 49)  # wrong amount
        + settle("t3", "j3", 1, 5)  # live, settled
        + settle("t9", "ghost", 1, 5)  # no such attempt
        + [LedgerEntry("cr", "client:j1", 3, "credit", "j1", 1, 1.0)],  # unbalanced
        attempts,
    )
    check_case(store, broken)
    problems, _ = verify_ledger(store)
    assert problems == [
        "ledger does not balance: entries sum to 3 micro-dollars",
        "transaction cr sums to 3 micro-dollars",
        "attempt j1#1 (SUCCEEDED) settled 2 times",
        "attempt j2#1: ledger charged 49, attempt says 50",
        "attempt j3#1 is RUNNING but settled",
        "attempt j4#1 (LOST) settled 0 times",
        "settlement for unknown attempt ghost#1",
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 0), (5, 5), (-7, -7), (Decimal("12"), 12), (Decimal("-3.000"), -3)],
)
def test_sums_come_back_as_int(value, expected):
    got = _int(value)
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value", [Decimal("1.5"), 2.0, "3", True])
def test_a_sum_that_is_not_whole_or_not_a_number_is_refused(value):
    with pytest.raises((TypeError, ValueError)):
        _int(value)
