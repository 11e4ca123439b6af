"""QuoteJob's spot prices (part of ``BrokerCore.quote``): a pure read of the kept index.

A GPU's spot price is its ask discounted, but never below its farm's floor
(``settlement.price_for``), so within one group (one ask) it only grows with the floor: the
cheapest and dearest spot prices of a group are those of its lowest and highest floor.
``Capacities.floors`` counts the GPUs of each group by floor, kept as workers change, so a
quote costs the distinct floors of the matching groups, not their workers.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.model import Tier
from broker.queue import Capacities
from broker.scheduler import GroupSummary
from broker.settlement import price_for

__all__ = ["spot_prices"]


def spot_prices(caps: Capacities, groups: Sequence[GroupSummary], spot_permille: int) -> list[int]:
    """The cheapest and the dearest spot price per GPU-hour in each of ``groups`` (the
    groups passing a job's filters): each GPU's discount stops at its farm's floor."""
    out: list[int] = []
    for group in groups:
        floors = caps.floors.get(group.key)
        if not floors:
            continue
        ask = group.price_micros_per_gpu_hour
        out.append(price_for(Tier.SPOT, ask, min(floors), spot_permille))
        out.append(price_for(Tier.SPOT, ask, max(floors), spot_permille))
    return out
