"""QuoteJob's spot prices (part of ``BrokerCore.quote``): a pure read of the kept index.

A GPU's spot price is its ask discounted, but never below its farm's floor, so it depends on
the GPU's farm and power limit as well as on its group. A quote needs only the cheapest and
the dearest, so the range is kept per group of the index (``Capacities.spot_ranges``), computed over
the group's workers the first time a quote meets it and again only once a worker joined, left
or changed in it (the index's ``stamp``): a quote costs the matching groups, not the fleet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from broker.economics import FarmTerms
from broker.model import Tier
from broker.queue import Capacities
from broker.records import Worker
from broker.scheduler import GroupSummary
from broker.settlement import floor_of, price_for

__all__ = ["spot_prices"]


def _range(
    caps: Capacities,
    workers: Mapping[str, Worker],
    farms: Mapping[str, FarmTerms],
    group: GroupSummary,
    spot_permille: int,
) -> tuple[int, int]:
    """The cheapest and dearest spot price per GPU-hour of the GPUs in ``group``, kept in
    ``caps.spot_ranges`` until a worker of the group changes."""
    key = group.key
    stamp = caps.fleet.stamp(key)
    kept = caps.spot_ranges.get(key)
    if kept is not None and kept[0] == stamp:
        return kept[1], kept[2]
    prices = _group_prices(caps, workers, farms, group, spot_permille)
    lo, hi = min(prices, default=0), max(prices, default=0)
    if len(caps.spot_ranges) > 2 * len(caps.of) + 64:  # groups come and go: forget old ones
        caps.spot_ranges.clear()
    caps.spot_ranges[key] = (stamp, lo, hi)
    return lo, hi


def _group_prices(
    caps: Capacities,
    workers: Mapping[str, Worker],
    farms: Mapping[str, FarmTerms],
    group: GroupSummary,
    spot_permille: int,
) -> list[int]:
    shape = (group.model, group.vram_mb, group.price_micros_per_gpu_hour, group.verified)
    rest = (group.score, group.pcie_mbps)
    prices: list[int] = []
    for worker_id in caps.fleet.workers_in(group):
        worker = workers[worker_id]
        terms = farms.get(worker.farm_id)
        for slot in caps.of[worker_id].gpus:
            if (slot.model, slot.vram_mb, slot.price_micros_per_gpu_hour, slot.verified) != shape:
                continue
            if (slot.score, slot.pcie_mbps) != rest:
                continue
            floor = floor_of(terms, worker, slot.index)
            prices.append(
                price_for(Tier.SPOT, slot.price_micros_per_gpu_hour, floor, spot_permille)
            )
    return prices


def spot_prices(
    caps: Capacities,
    workers: Mapping[str, Worker],
    farms: Mapping[str, FarmTerms],
    groups: Sequence[GroupSummary],
    spot_permille: int,
) -> list[int]:
    """The cheapest and the dearest spot price per GPU-hour in each of ``groups`` (the
    groups passing a job's filters): each GPU's discount stops at its farm's floor."""
    out: list[int] = []
    for group in groups:
        out += _range(caps, workers, farms, group, spot_permille)
    return out
