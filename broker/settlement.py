"""What the core owes and charges: prices, settlement and SLA credits (pure functions).

``BrokerCore`` calls these and posts what they return (``PostLedger``); nothing here
changes a record. The arithmetic is ``broker.economics``'s (integer micro-dollars).

SLA events and when they carry a credit (PRODUCT.md, ``docs/economics.md``):

* ``START_DEADLINE_MISSED`` -- a guaranteed job first placed ``delay`` seconds after
  its start deadline: credited ``delay`` of its GPUs at its price (at most one hour)
  when waiting was the fleet's fault (every pending reason resolvable); 0 when the
  spec was impossible for a while.
* ``INTERRUPTION`` -- an attempt was lost (lease expired, agent restarted) or
  preempted: never credited by itself.
* ``LOST_WORK`` -- with an interruption of an attempt that had started: the seconds
  since its last checkpoint (or its start), credited for a guaranteed job, 0 for spot.
* ``HEARTBEAT_GAP`` -- the rig of a running attempt stopped heartbeating: no credit.

A credit is one balanced transaction: the client's account gains it, the broker's
``broker:sla_credits`` account pays it.
"""

from __future__ import annotations

from broker.economics import (
    FarmTerms,
    LedgerEntry,
    charge_micros,
    credit_for_seconds,
    floor_price,
    settlement_entries,
)
from broker.model import SlaKind, Tier
from broker.records import Attempt, Job, SlaEvent, Worker

__all__ = [
    "credit_legs",
    "curtailed",
    "farm_credit_legs",
    "floor_of",
    "interruption",
    "lost_work",
    "price_for",
    "settlement",
    "start_deadline_missed",
]


def price_for(tier: Tier, ask_micros: int, floor_micros: int, spot_permille: int) -> int:
    """What a job pays per GPU-hour on a GPU with this ask: spot is discounted, but
    never below the farm's floor (what the GPU would earn mining or cost in power)."""
    if tier == Tier.SPOT:
        return min(ask_micros, max(ask_micros * spot_permille // 1000, floor_micros))
    return ask_micros


def floor_of(terms: FarmTerms | None, worker: Worker, index: int) -> int:
    """Floor price per GPU-hour of one GPU of ``worker`` (0 when its farm set no terms)."""
    if terms is None:
        return 0
    info = worker.gpus[index].info
    return floor_price(terms, info.model, info.power_limit_watts or None).floor_micros


def settlement(
    job: Job, attempt: Attempt, farm_id: str, fee_permille: int, now: float
) -> tuple[int, list[LedgerEntry]]:
    """(charge, legs) settling an ended attempt: its GPU time at its price."""
    charge = charge_micros(attempt.gpu_milliseconds(now), attempt.price_micros_per_gpu_hour)
    legs = settlement_entries(
        owner=job.owner,
        farm_id=farm_id,
        job_id=job.job_id,
        attempt=attempt.number,
        charge=charge,
        fee_permille=fee_permille,
        now=now,
    )
    return charge, legs


def start_deadline_missed(
    job: Job, gpu_count: int, price: int, deadline_s: float, now: float
) -> SlaEvent | None:
    """The SLA event of a guaranteed job's first placement after its deadline, else None."""
    if job.attempts or job.spec.tier != Tier.GUARANTEED:
        return None
    delay = now - job.create_time - deadline_s
    if delay <= 0:
        return None
    # Credit only when waiting was the fleet's fault, not an impossible spec.
    fault = all(r.resolvable for r in job.pending_reasons)
    credit = credit_for_seconds(delay, gpu_count, price) if fault else 0
    detail = f"started {int(delay)} s after its {int(deadline_s)} s deadline"
    return SlaEvent(SlaKind.START_DEADLINE_MISSED, now, 1, int(delay), credit, detail)


def interruption(attempt: Attempt, why: str, now: float) -> SlaEvent:
    """The SLA event of an attempt lost or preempted (never credited by itself)."""
    return SlaEvent(SlaKind.INTERRUPTION, now, attempt.number, 0, 0, why)


def lost_work(job: Job, attempt: Attempt, now: float) -> SlaEvent | None:
    """The work an ended attempt lost since its last checkpoint (or its start), credited
    for a guaranteed job; None when it never started."""
    if attempt.start_time is None or attempt.end_time is None:
        return None
    since = attempt.last_checkpoint_time or attempt.start_time
    lost_s = max(0.0, attempt.end_time - since)
    credit = 0
    if job.spec.tier == Tier.GUARANTEED:
        n = len(attempt.gpu_indices)
        credit = credit_for_seconds(lost_s, n, attempt.price_micros_per_gpu_hour)
    what = "the last checkpoint" if attempt.last_checkpoint_time else "the start"
    detail = f"{int(lost_s)} s of work since {what} lost"
    return SlaEvent(SlaKind.LOST_WORK, now, attempt.number, int(lost_s), credit, detail)


def credit_legs(job: Job, event: SlaEvent, number: int) -> list[LedgerEntry]:
    """The transaction paying ``event``'s credit, the job's ``number``-th SLA event."""
    credit = event.credit_micros
    txn = f"credit:{job.job_id}:{event.attempt}:{event.kind.value}:{number}"
    return [
        LedgerEntry(
            txn, f"client:{job.owner}", credit, "sla_credit", job.job_id, event.attempt, event.time
        ),
        LedgerEntry(
            txn, "broker:sla_credits", -credit, "sla_credit", job.job_id, event.attempt, event.time
        ),
    ]


def curtailed(job: Job, attempt: Attempt, why: str, now: float) -> SlaEvent:
    """The SLA event of an attempt a curtailment window stopped (``CURTAILED``: not a rig
    failure). A guaranteed job is credited the work lost since its last checkpoint (or its
    start), paid by the farm (:func:`farm_credit_legs`); a spot job is credited nothing."""
    lost = lost_work(job, attempt, now)
    lost_s = lost.seconds if lost is not None else 0
    credit = lost.credit_micros if lost is not None else 0
    return SlaEvent(SlaKind.CURTAILED, now, attempt.number, lost_s, credit, why)


def farm_credit_legs(job: Job, event: SlaEvent, number: int, farm_id: str) -> list[LedgerEntry]:
    """The transaction paying ``event``'s credit to the client from the farm's account (a
    curtailment the farm chose), the job's ``number``-th SLA event."""
    credit = event.credit_micros
    txn = f"credit:{job.job_id}:{event.attempt}:{event.kind.value}:{number}"
    return [
        LedgerEntry(
            txn, f"client:{job.owner}", credit, "sla_credit", job.job_id, event.attempt, event.time
        ),
        LedgerEntry(
            txn, f"farm:{farm_id}", -credit, "sla_credit", job.job_id, event.attempt, event.time
        ),
    ]
