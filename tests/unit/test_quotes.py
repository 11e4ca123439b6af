"""QuoteJob's spot prices (``broker.quotes``): the floors counted per group follow the farms'
terms and the workers as they change, and give what a walk over every GPU gives."""

from __future__ import annotations

from test_core_contract import quoted_fleet

from broker.core import BrokerCore
from broker.economics import FarmTerms
from broker.events import DrainRequested, FarmConfigured
from broker.model import JobSpec, Tier
from broker.queue import job_request
from broker.scheduler import passes
from broker.settlement import price_for

SPOT = JobSpec(command=("x",), tier=Tier.SPOT)


def walked(core: BrokerCore, spec: JobSpec) -> tuple[int, int]:
    """The spot range as QuoteJob computed it before issue 17: every GPU of every worker."""
    request = job_request("q", spec, core.spot_permille)
    prices = []
    for worker_id, capacity in core._caps.of.items():
        if worker_id not in core._caps.fleet:
            continue
        for slot in capacity.gpus:
            if passes(request, slot, capacity):
                floor = core.floor_of(core.workers[worker_id], slot.index)
                ask = slot.price_micros_per_gpu_hour
                prices.append(price_for(Tier.SPOT, ask, floor, core.spot_permille))
    return min(prices, default=0), max(prices, default=0)


def quoted(core: BrokerCore, spec: JobSpec) -> tuple[int, int]:
    q = core.quote(spec)
    return q.min_price_micros_per_gpu_hour, q.max_price_micros_per_gpu_hour


def test_spot_range_follows_farm_terms_and_workers() -> None:
    core = quoted_fleet()
    # w-cheap 60% of $0.30 = 180,000 (no terms); w-dear max(300,000, floor 350,000)
    assert quoted(core, SPOT) == walked(core, SPOT) == (180_000, 350_000)
    core.handle(FarmConfigured(1.0, FarmTerms("f", tariff_micros_per_kwh=100_000)))
    # floor 0.35 kW x $0.10/kWh = 35,000: w-dear now 60% of $0.50 = 300,000
    assert quoted(core, SPOT) == walked(core, SPOT) == (180_000, 300_000)
    core.handle(FarmConfigured(2.0, FarmTerms("g", tariff_micros_per_kwh=2_000_000)))
    # w-cheap's floor 0.35 x $2.00 = 700,000 lifts its ask (and so its spot price) to it
    assert quoted(core, SPOT) == walked(core, SPOT) == (300_000, 700_000)
    core.handle(DrainRequested(3.0, "w-dear"))
    assert quoted(core, SPOT) == walked(core, SPOT) == (700_000, 700_000)
    assert core._caps.floors.keys() == {
        g.key for g in core._caps.fleet.matching(job_request("q", SPOT, core.spot_permille))
    }
