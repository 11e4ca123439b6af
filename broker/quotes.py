"""QuoteJob's spot prices (part of ``BrokerCore.quote``): a pure read of the kept index."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from broker.economics import FarmTerms
from broker.model import Tier
from broker.queue import Capacities
from broker.records import Worker
from broker.scheduler import GroupSummary, JobRequest, passes
from broker.settlement import floor_of, price_for

__all__ = ["spot_prices"]


def spot_prices(
    caps: Capacities,
    workers: Mapping[str, Worker],
    farms: Mapping[str, FarmTerms],
    request: JobRequest,
    groups: Sequence[GroupSummary],
    spot_permille: int,
) -> list[int]:
    """The spot price per GPU-hour of every GPU passing ``request``'s filters in
    ``groups``: each GPU's discount stops at its farm's floor. A worker's GPUs may span
    several matching groups; each is counted once."""
    prices: list[int] = []
    seen: set[str] = set()
    for group in groups:
        for worker_id in caps.fleet.workers_in(group):
            if worker_id in seen:
                continue
            seen.add(worker_id)
            worker = workers[worker_id]
            terms = farms.get(worker.farm_id)
            capacity = caps.of[worker_id]
            for slot in capacity.gpus:
                if passes(request, slot, capacity):
                    floor = floor_of(terms, worker, slot.index)
                    ask = slot.price_micros_per_gpu_hour
                    prices.append(price_for(Tier.SPOT, ask, floor, spot_permille))
    return prices
