"""Random ledgers for the SQL ledger checks (``broker.store.ledger_sql``), shared by the
SQLite test (tests/unit) and the PostgreSQL one (tests/integration).

Import it as ``from ledger_cases import ledgers, write`` (tests/ is on sys.path).

A case is built from attempts, each settled zero, one or two times (the charge equal to
its ``charge_micros`` or not), plus broken legs: an unbalanced transaction, a settlement
naming a missing attempt, a live attempt settled, and (SQLite only) a leg whose amount is
not an integer. ``write`` stores a case in a database through the store's tables.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

from hypothesis import strategies as st
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from broker.economics import LedgerEntry
from broker.ledger import AttemptCharge, ledger_problems, ledger_summary, verify_ledger
from broker.model import AttemptState
from broker.store import Store
from broker.store.rows import AttemptRow, JobRow, LedgerRow

__all__ = ["Case", "check_case", "ledgers", "write"]

STATES = [str(s) for s in AttemptState]
# Job ids whose code-point order differs from a case-insensitive collation's.
JOB_IDS = ["a", "B", "b", "Z", "j-1", "j_2", "J10"]


@dataclass
class Case:
    """Legs (in id order) and attempt rows: what the database holds."""

    legs: list[LedgerEntry]
    attempts: list[AttemptCharge]


@st.composite
def ledgers(draw: st.DrawFn, non_integers: bool = False) -> Case:
    """A random, possibly broken, ledger and the attempts it settles."""
    amount = st.integers(min_value=0, max_value=10**12)
    keys = draw(
        st.lists(st.tuples(st.sampled_from(JOB_IDS), st.integers(1, 4)), unique=True, max_size=8)
    )
    attempts = [
        AttemptCharge(job, n, draw(st.sampled_from(STATES)), draw(amount)) for job, n in keys
    ]
    legs: list[LedgerEntry] = []
    t = 0

    def settle(job: str, number: int, charge: int) -> None:
        nonlocal t
        t += 1
        fee = draw(st.integers(0, charge))
        txn = f"settle:{job}:{number}:{t}"
        legs.extend(
            [
                LedgerEntry(txn, f"client:{job}", -charge, "charge", job, number, float(t)),
                LedgerEntry(txn, "farm:f", charge - fee, "payout", job, number, float(t)),
                LedgerEntry(txn, "broker:fees", fee, "fee", job, number, float(t)),
            ]
        )

    for a in attempts:
        times = draw(st.sampled_from([0, 1, 1, 1, 2]))
        for _ in range(times):
            right = draw(st.booleans()) or draw(st.booleans())
            settle(a.job_id, a.number, a.charge_micros if right else draw(amount))
    for job, n in draw(
        st.lists(st.tuples(st.sampled_from(["ghost", "a"]), st.integers(5, 6)), max_size=2)
    ):
        settle(job, n, draw(amount))  # an attempt that does not exist
    for _ in range(draw(st.integers(0, 2))):  # an unbalanced transaction (a credit, say)
        t += 1
        job = draw(st.sampled_from(JOB_IDS))
        legs.append(
            LedgerEntry(f"credit:{t}", f"client:{job}", draw(amount), "credit", job, 1, float(t))
        )
    if non_integers:
        for _ in range(draw(st.integers(0, 2))):
            t += 1
            bad = draw(st.integers(-1000, 1000)) + 0.5  # SQLite keeps a fraction as REAL
            kind = draw(st.sampled_from(["charge", "payout"]))
            legs.append(LedgerEntry(f"odd:{t}", "farm:f", bad, kind, "a", 1, float(t)))  # type: ignore[arg-type]
    order = draw(st.permutations(range(len(legs))))
    return Case([legs[i] for i in order], attempts)


def write(engine: Engine, case: Case) -> None:
    """Store the case: a job row per job id, the attempt rows, the legs in order."""
    jobs = sorted({a.job_id for a in case.attempts})
    with engine.begin() as conn:
        conn.execute(LedgerRow.__table__.delete())  # type: ignore[attr-defined]
        conn.execute(AttemptRow.__table__.delete())  # type: ignore[attr-defined]
        conn.execute(JobRow.__table__.delete())  # type: ignore[attr-defined]
        if jobs:
            conn.execute(
                insert(JobRow.__table__),  # type: ignore[attr-defined]
                [
                    {"id": j, "owner": "o", "request_id": "", "spec_json": "{}", "state": "X"}
                    | {"create_time": 0.0, "update_time": 0.0, "status_message": ""}
                    | {"exit_code": 0, "pending_reasons_json": "[]", "credit_micros": 0}
                    | {"checkpoint_sha256": "", "checkpoint_time": None}
                    for j in jobs
                ],
            )
        if case.attempts:
            conn.execute(
                insert(AttemptRow.__table__),  # type: ignore[attr-defined]
                [
                    {
                        "job_id": a.job_id,
                        "number": a.number,
                        "worker_id": "w",
                        "gpu_indices_json": "[0]",
                        "price_micros_per_gpu_hour": 0,
                        "state": a.state,
                        "schedule_time": 0.0,
                        "energy_joules": 0,
                        "last_sequence": 0,
                        "message": "",
                        "charge_micros": a.charge_micros,
                        "settled": False,
                        "setup_ms": 0,
                        "output_json": "",
                        "power_limit_watts": 0,
                    }
                    for a in case.attempts
                ],
            )
        for i, e in enumerate(case.legs, start=1):
            conn.execute(
                insert(LedgerRow.__table__),  # type: ignore[attr-defined]
                {"id": i, **asdict(e)},
            )


def reference_balances(case: Case) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for e in case.legs:
        if isinstance(e.amount_micros, int):
            out[e.account] += e.amount_micros
    return dict(out)


def check_case(store: Store, case: Case) -> None:
    """Write the case and compare every SQL figure with the Python reference."""
    write(store.engine, case)
    problems, summary = verify_ledger(store)
    assert problems == ledger_problems(case.legs, case.attempts)
    assert summary == ledger_summary(case.legs)
    for value in summary.values():
        assert type(value) is int
    balances = store.balances()
    assert balances == reference_balances(case)
    assert all(type(v) is int for v in balances.values())
    assert store.balances(["broker:fees", "nobody"])["nobody"] == 0
    totals = store.ledger_totals()
    assert totals.imbalance_micros == summary["balance_micros"]
    payouts: dict[str, int] = defaultdict(int)
    for e in case.legs:
        if e.kind == "payout" and isinstance(e.amount_micros, int):
            payouts[e.account.removeprefix("farm:")] += e.amount_micros
    assert totals.payouts_by_farm == dict(payouts)
