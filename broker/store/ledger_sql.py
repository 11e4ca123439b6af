"""The ledger as SQL aggregates: balances, the settled-once checks, what earnings read.

The broker keeps no ledger in memory (``BrokerCore(keep_ledger=False)``, docs/scale.md
section 1): everything that needs the legs asks the database here, with ``GROUP BY``
queries that run on SQLite and PostgreSQL, so no caller loads every leg.

:func:`ledger_check` reports exactly what ``broker.ledger.ledger_problems`` (the Python
reference) reports for the same legs and attempts, with the same strings in the same
order: the aggregates find the few rows that are wrong and Python sorts those (SQL
collations differ from Python's code-point order).

Money is integer micro-dollars. ``SUM`` of a ``BIGINT`` is ``NUMERIC`` on PostgreSQL (a
``Decimal`` in Python) and an integer on SQLite; :func:`_int` turns every sum back into
an ``int`` and refuses a fractional one, so no float or Decimal leaves this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, ColumnElement, and_, case, cast, func, literal, not_, or_, select, true
from sqlalchemy.engine import Connection

from broker.earnings import Settled
from broker.metrics_tally import EnergyGroup, HistoryTotals
from broker.model import LIVE_ATTEMPT_STATES, TERMINAL_JOB_STATES, AttemptState, SlaKind
from broker.records import Attempt, AttemptOutput
from broker.store.rows import AttemptRow, JobRow, LedgerRow, SlaEventRow, WorkerRow

__all__ = [
    "LedgerTotals",
    "balance",
    "balances",
    "history_totals",
    "ledger_check",
    "ledger_totals",
    "settled_attempts",
]

_LEDGER = LedgerRow.__table__  # type: ignore[attr-defined]
_ATTEMPTS = AttemptRow.__table__  # type: ignore[attr-defined]
_WORKERS = WorkerRow.__table__  # type: ignore[attr-defined]
_JOBS = JobRow.__table__  # type: ignore[attr-defined]
_SLA = SlaEventRow.__table__  # type: ignore[attr-defined]
MAX_SPLIT_GPUS = 16
"""The most GPUs of one attempt whose per-GPU energy split :func:`history_totals` sums
exactly; an attempt on more GPUs gives the later ones nothing of its remainder joules."""
_LIVE = sorted(str(s) for s in LIVE_ATTEMPT_STATES)


def _int(value: Any) -> int:
    """A SUM's value as an int (None: 0); a fractional value is a bug, never rounded."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise TypeError(f"a ledger sum came back as {type(value).__name__}: {value!r}")
    if isinstance(value, Decimal):
        if value != value.to_integral_value():
            raise ValueError(f"a ledger sum is not whole: {value}")
        return int(value)
    return value


def _is_int(conn: Connection) -> ColumnElement[bool]:
    """Whether a leg's amount is an integer. Always on PostgreSQL (a BIGINT column); SQLite
    stores whatever it is given, so a tampered REAL or TEXT amount is possible there."""
    if conn.dialect.name == "sqlite":
        return func.typeof(_LEDGER.c.amount_micros) == literal("integer")
    return true()


def _charges(conn: Connection) -> Any:
    """Per (job_id, attempt): the number of integer ``charge`` legs and what they charged."""
    lg = _LEDGER.c
    return (
        select(
            lg.job_id.label("job_id"),
            lg.attempt.label("attempt"),
            func.count().label("n"),
            func.sum(-lg.amount_micros).label("charged"),
        )
        .where(lg.kind == "charge", _is_int(conn))
        .group_by(lg.job_id, lg.attempt)
        .subquery("charges")
    )


def ledger_check(conn: Connection) -> tuple[list[str], dict[str, int]]:
    """(discrepancies, summary figures) of the ledger in the database: the problems of
    ``broker.ledger.ledger_problems`` over every leg and every attempt row, and the figures
    of ``broker.ledger.verify_ledger``. A handful of aggregate queries; no leg is loaded
    unless it is wrong."""
    lg, at = _LEDGER.c, _ATTEMPTS.c
    is_int = _is_int(conn)
    problems: list[str] = []
    # 1. amounts that are not integers (SQLite only), in leg order; then the balance
    if conn.dialect.name == "sqlite":
        for txn, amount in conn.execute(
            select(lg.txn, lg.amount_micros).where(not_(is_int)).order_by(lg.id)
        ):
            problems.append(f"{txn}: amount {amount!r} is not an integer")
    entries, txns, total, settled, charged = conn.execute(
        select(
            func.count(),
            func.count(lg.txn.distinct()),
            func.sum(case((is_int, lg.amount_micros), else_=None)),
            func.count(case((and_(is_int, lg.kind == "charge"), 1), else_=None)),
            func.sum(case((and_(is_int, lg.kind == "charge"), -lg.amount_micros), else_=None)),
        ).select_from(_LEDGER)
    ).one()
    total = _int(total)
    if total != 0:
        problems.append(f"ledger does not balance: entries sum to {total} micro-dollars")
    # 2. transactions that do not sum to zero
    unbalanced = conn.execute(
        select(lg.txn, func.sum(lg.amount_micros))
        .where(is_int)
        .group_by(lg.txn)
        .having(func.sum(lg.amount_micros) != 0)
    ).all()
    for txn, amount in sorted((t, _int(a)) for t, a in unbalanced):
        problems.append(f"transaction {txn} sums to {amount} micro-dollars")
    # 3. attempts settled other than exactly once, or for another amount
    ch = _charges(conn)
    n = func.coalesce(ch.c.n, 0)
    live = at.state.in_(_LIVE)
    wrong = conn.execute(
        select(at.job_id, at.number, at.state, at.charge_micros, n, ch.c.charged)
        .select_from(
            _ATTEMPTS.outerjoin(ch, and_(ch.c.job_id == at.job_id, ch.c.attempt == at.number))
        )
        .where(
            or_(
                and_(live, n > 0),
                and_(not_(live), or_(n != 1, ch.c.charged != at.charge_micros)),
            )
        )
    ).all()
    for job_id, number, state, charge, count, paid in sorted(wrong, key=lambda r: (r[0], r[1])):
        if state in _LIVE:
            problems.append(f"attempt {job_id}#{number} is {state} but settled")
        elif count != 1:
            problems.append(f"attempt {job_id}#{number} ({state}) settled {count} times")
        else:
            problems.append(
                f"attempt {job_id}#{number}: ledger charged {_int(paid)}, attempt says {charge}"
            )
    unknown = conn.execute(
        select(ch.c.job_id, ch.c.attempt)
        .select_from(
            ch.outerjoin(_ATTEMPTS, and_(ch.c.job_id == at.job_id, ch.c.attempt == at.number))
        )
        .where(at.job_id.is_(None))
    ).all()
    for job_id, number in sorted((j, a) for j, a in unknown):
        problems.append(f"settlement for unknown attempt {job_id}#{number}")
    summary = {
        "entries": int(entries),
        "transactions": int(txns),
        "settled_attempts": int(settled),
        "client_charges_micros": _int(charged),
        "balance_micros": total,
    }
    return problems, summary


def balances(conn: Connection, accounts: list[str] | None = None) -> dict[str, int]:
    """account -> the sum of its legs (micro-dollars), for every account with a leg (or
    only ``accounts``; an account without legs is then 0)."""
    lg = _LEDGER.c
    q = select(lg.account, func.sum(lg.amount_micros)).where(_is_int(conn)).group_by(lg.account)
    if accounts is not None:
        q = q.where(lg.account.in_(accounts))
    out = {account: _int(amount) for account, amount in conn.execute(q)}
    for account in accounts or ():
        out.setdefault(account, 0)
    return out


def balance(conn: Connection, account: str) -> int:
    """One account's balance (micro-dollars)."""
    return balances(conn, [account])[account]


def history_totals(conn: Connection) -> HistoryTotals:
    """What the broker's metrics start from (``broker.metrics_tally``), in five aggregate
    queries: the ledger's sum and payouts, finished jobs by state and tier, SLA events and
    credits by kind, curtailed attempts by worker and tier, and the energy of settled
    attempts grouped by worker and GPUs with its exact per-GPU split."""
    jb, at, sl = _JOBS.c, _ATTEMPTS.c, _SLA.c
    ledger = ledger_totals(conn)
    # The tier in the spec's JSON: SQLite's json_extract (a CAST to JSON there is numeric).
    if conn.dialect.name == "sqlite":
        tier: Any = func.json_extract(jb.spec_json, "$.tier")
    else:
        tier = cast(jb.spec_json, JSON)["tier"].as_string()
    finished = conn.execute(
        select(jb.state, tier, func.count())
        .where(jb.state.in_(sorted(str(s) for s in TERMINAL_JOB_STATES)))
        .group_by(jb.state, tier)
    ).all()
    sla = conn.execute(
        select(sl.kind, func.count(), func.sum(sl.credit_micros)).group_by(sl.kind)
    ).all()
    curtailed = conn.execute(
        select(at.worker_id, tier, func.count())
        .select_from(
            _SLA.join(_ATTEMPTS, and_(at.job_id == sl.job_id, at.number == sl.attempt)).join(
                _JOBS, jb.id == sl.job_id
            )
        )
        .where(sl.kind == str(SlaKind.CURTAILED))
        .group_by(at.worker_id, tier)
    ).all()
    # An attempt's joules split evenly over its n GPUs, the first (joules mod n) getting one
    # more: per group, the sum of (joules div n) and, per position i, how many attempts
    # had a remainder above i. n is counted from the JSON list's commas ("[0, 1]").
    gpus = at.gpu_indices_json
    n = func.length(gpus) - func.length(func.replace(gpus, ",", "")) + 1
    e = at.energy_joules
    columns = [func.sum(e), func.sum(e // n)]
    columns += [func.sum(case((e % n > i, 1), else_=0)) for i in range(MAX_SPLIT_GPUS)]
    energy = []
    for row in conn.execute(
        select(at.worker_id, gpus, *columns)
        .where(at.settled == true(), e != 0)
        .group_by(at.worker_id, gpus)
    ):
        worker_id, indices_json, joules, base, *extra = row
        indices = tuple(json.loads(indices_json))
        per_gpu = tuple(
            _int(base) + (_int(extra[i]) if i < MAX_SPLIT_GPUS else 0) for i in range(len(indices))
        )
        if not indices:
            per_gpu = ()
        energy.append(EnergyGroup(worker_id, indices, _int(joules), per_gpu))
    return HistoryTotals(
        imbalance_micros=ledger.imbalance_micros,
        payouts_by_farm=ledger.payouts_by_farm,
        finished_jobs={(state, str(t)): int(c) for state, t, c in finished},
        sla={kind: (int(c), _int(credit)) for kind, c, credit in sla},
        curtailed={(w, str(t)): int(c) for w, t, c in curtailed},
        energy=energy,
    )


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """What the broker's metrics start from: the sum of every leg (0 when it balances) and
    each farm's payouts (``farm:<id>`` accounts, ``payout`` legs)."""

    imbalance_micros: int
    payouts_by_farm: dict[str, int]


def ledger_totals(conn: Connection) -> LedgerTotals:
    """The ledger's :class:`LedgerTotals`, in two aggregate queries."""
    lg = _LEDGER.c
    is_int = _is_int(conn)
    total = conn.execute(select(func.sum(lg.amount_micros)).where(is_int)).scalar()
    payouts = conn.execute(
        select(lg.account, func.sum(lg.amount_micros))
        .where(is_int, lg.kind == "payout", lg.account.like("farm:%"))
        .group_by(lg.account)
    ).all()
    return LedgerTotals(
        _int(total), {account.removeprefix("farm:"): _int(m) for account, m in payouts}
    )


def settled_attempts(
    conn: Connection, *, farm_id: str = "", since: float | None = None
) -> Iterator[Settled]:
    """Every settled attempt that ended (at or after ``since``), on a worker of ``farm_id``
    when set, with its payout summed in SQL; streamed in (job_id, number) order, so the
    caller holds one at a time."""
    lg, at, wk = _LEDGER.c, _ATTEMPTS.c, _WORKERS.c
    pay = (
        select(
            lg.job_id.label("job_id"),
            lg.attempt.label("attempt"),
            func.sum(lg.amount_micros).label("paid"),
        )
        .where(lg.kind == "payout", _is_int(conn))
        .group_by(lg.job_id, lg.attempt)
        .subquery("pay")
    )
    source = _ATTEMPTS.outerjoin(pay, and_(pay.c.job_id == at.job_id, pay.c.attempt == at.number))
    q = select(_ATTEMPTS, pay.c.paid).where(at.settled == true(), at.end_time.is_not(None))
    if since is not None:
        q = q.where(at.end_time >= since)
    if farm_id:
        source = source.join(_WORKERS, wk.id == at.worker_id)
        q = q.where(wk.farm_id == farm_id)
    q = q.select_from(source).order_by(at.job_id, at.number)
    result = conn.execution_options(yield_per=500).execute(q)
    for row in result:
        yield Settled(_attempt(row._mapping), _int(row.paid))


def _attempt(a: Any) -> Attempt:
    """An attempts row (a mapping) as the core's record."""
    return Attempt(
        a["job_id"],
        a["number"],
        a["worker_id"],
        tuple(json.loads(a["gpu_indices_json"])),
        a["price_micros_per_gpu_hour"],
        a["schedule_time"],
        AttemptState(a["state"]),
        a["start_time"],
        a["end_time"],
        a["exit_code"],
        a["energy_joules"],
        a["last_sequence"],
        a["message"],
        a["charge_micros"],
        bool(a["settled"]),
        a["last_checkpoint_time"],
        a["setup_ms"],
        AttemptOutput(**json.loads(a["output_json"])) if a["output_json"] else None,
        a["power_limit_watts"],
    )
