"""The ledger checker: one set of checks, for the core in memory and for a database.

:func:`ledger_problems` checks ledger legs against the attempts they settle, and reports
every discrepancy found, in this order:

1. every amount is an integer and the sum of all entries is zero;
2. every transaction's legs sum to zero;
3. every ended attempt is settled exactly once (one ``charge`` leg), its charge equals
   the attempt's ``charge_micros``, no live attempt is settled, and no settlement names
   an attempt that does not exist.

Its callers: ``broker.invariants.validate_state`` (the core's records, after every step
of a test) and the trace replay. A broker's database is checked by the same rules as SQL
aggregates (``broker.store.ledger_sql``; :func:`verify_ledger`, ``rigshift admin
verify-ledger``), which a Hypothesis test holds equal to :func:`ledger_problems`. This
module imports neither the core nor the store.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from broker.model import LIVE_ATTEMPT_STATES

__all__ = [
    "AttemptCharge",
    "Leg",
    "charges_of",
    "ledger_problems",
    "ledger_summary",
    "verify_ledger",
]


class Leg(Protocol):
    """One leg of a ledger transaction (``economics.LedgerEntry``, a store ``LedgerRow``)."""

    @property
    def txn(self) -> str: ...

    @property
    def amount_micros(self) -> Any: ...  # an int, unless something wrote a wrong value

    @property
    def kind(self) -> str: ...

    @property
    def job_id(self) -> str: ...

    @property
    def attempt(self) -> int: ...


@dataclass(frozen=True, slots=True)
class AttemptCharge:
    """What the ledger must agree with about one attempt."""

    job_id: str
    number: int
    state: str  # AttemptState's name
    charge_micros: int

    @property
    def live(self) -> bool:
        return self.state in LIVE_ATTEMPT_STATES


class _Job(Protocol):
    @property
    def job_id(self) -> str: ...

    @property
    def attempts(self) -> Iterable[Any]: ...


def charges_of(jobs: Iterable[_Job]) -> list[AttemptCharge]:
    """The attempts of the core's job records, as the checker reads them."""
    return [
        AttemptCharge(job.job_id, a.number, str(a.state), a.charge_micros)
        for job in jobs
        for a in job.attempts
    ]


def ledger_problems(legs: Iterable[Leg], attempts: Iterable[AttemptCharge]) -> list[str]:
    """Every discrepancy between the legs and the attempts (the module docstring)."""
    problems: list[str] = []
    total = 0
    per_txn: dict[str, int] = defaultdict(int)
    charges: Counter[tuple[str, int]] = Counter()
    charged: dict[tuple[str, int], int] = {}
    for e in legs:
        if not isinstance(e.amount_micros, int):
            problems.append(f"{e.txn}: amount {e.amount_micros!r} is not an integer")
            continue
        total += e.amount_micros
        per_txn[e.txn] += e.amount_micros
        if e.kind == "charge":
            charges[(e.job_id, e.attempt)] += 1
            charged[(e.job_id, e.attempt)] = -e.amount_micros
    if total != 0:
        problems.append(f"ledger does not balance: entries sum to {total} micro-dollars")
    for txn, amount in sorted(per_txn.items()):
        if amount != 0:
            problems.append(f"transaction {txn} sums to {amount} micro-dollars")
    known = set()
    for a in sorted(attempts, key=lambda a: (a.job_id, a.number)):
        key = (a.job_id, a.number)
        known.add(key)
        n = charges.get(key, 0)
        if a.live:
            if n:
                problems.append(f"attempt {a.job_id}#{a.number} is {a.state} but settled")
        elif n != 1:
            problems.append(f"attempt {a.job_id}#{a.number} ({a.state}) settled {n} times")
        elif charged[key] != a.charge_micros:
            problems.append(
                f"attempt {a.job_id}#{a.number}: ledger charged {charged[key]}, "
                f"attempt says {a.charge_micros}"
            )
    for job_id, number in sorted(set(charges) - known):
        problems.append(f"settlement for unknown attempt {job_id}#{number}")
    return problems


def ledger_summary(legs: Iterable[Leg]) -> dict[str, int]:
    """The summary figures of ``rigshift admin verify-ledger`` over these legs (the Python
    reference of ``broker.store.ledger_sql.ledger_check``'s)."""
    legs = list(legs)
    charges = [e for e in legs if e.kind == "charge" and isinstance(e.amount_micros, int)]
    return {
        "entries": len(legs),
        "transactions": len({e.txn for e in legs}),
        "settled_attempts": len(charges),
        "client_charges_micros": -sum(e.amount_micros for e in charges),
        "balance_micros": sum(e.amount_micros for e in legs if isinstance(e.amount_micros, int)),
    }


class _LedgerStore(Protocol):
    def ledger_check(self) -> tuple[list[str], dict[str, int]]: ...


def verify_ledger(store: _LedgerStore) -> tuple[list[str], dict[str, int]]:
    """(discrepancies, summary figures) of the ledger in a broker's database: the checks of
    :func:`ledger_problems` as SQL aggregates (``broker.store.ledger_sql``), so no leg is
    loaded into memory unless it is wrong."""
    return store.ledger_check()
