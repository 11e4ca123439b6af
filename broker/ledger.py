"""Ledger verification straight from the database (``rigshift admin verify-ledger``).

Checks, in order, and reports every discrepancy found:

1. every amount is an integer and the sum of all entries is zero;
2. every transaction's legs sum to zero;
3. every ended attempt is settled exactly once (one ``charge`` leg), its charge
   equals the attempt's ``charge_micros``, and no live attempt is settled.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from sqlmodel import Session, select

from broker.store import AttemptRow, LedgerRow, Store

__all__ = ["verify_ledger"]

LIVE = {"SCHEDULED", "RUNNING"}


def verify_ledger(store: Store) -> tuple[list[str], dict[str, int]]:
    """(discrepancies, summary figures) of the ledger in ``store``."""
    problems: list[str] = []
    with Session(store.engine) as s:
        entries = list(s.exec(select(LedgerRow)))
        attempts = list(s.exec(select(AttemptRow)))
    total = 0
    per_txn: dict[str, int] = defaultdict(int)
    charges: Counter[tuple[str, int]] = Counter()
    charged: dict[tuple[str, int], int] = {}
    for e in entries:
        if not isinstance(e.amount_micros, int):
            problems.append(f"entry {e.id} ({e.txn}): amount {e.amount_micros!r} is not an integer")
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
    for a in sorted(attempts, key=lambda a: (a.job_id, a.number)):
        key = (a.job_id, a.number)
        n = charges.get(key, 0)
        if a.state in LIVE:
            if n:
                problems.append(f"attempt {a.job_id}#{a.number} is {a.state} but settled")
        elif n != 1:
            problems.append(f"attempt {a.job_id}#{a.number} ({a.state}) settled {n} times")
        elif charged[key] != a.charge_micros:
            problems.append(
                f"attempt {a.job_id}#{a.number}: ledger charged {charged[key]}, "
                f"attempt says {a.charge_micros}"
            )
    known = {(a.job_id, a.number) for a in attempts}
    for key in sorted(set(charges) - known):
        problems.append(f"settlement for unknown attempt {key[0]}#{key[1]}")
    summary = {
        "entries": len(entries),
        "transactions": len(per_txn),
        "settled_attempts": sum(charges.values()),
        "client_charges_micros": sum(charged.values()),
        "balance_micros": total,
    }
    return problems, summary
