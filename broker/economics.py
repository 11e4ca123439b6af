"""Farm economics, settlement and SLA credits: pure integer arithmetic (no floats in money).

Units: money in integer micro-dollars, energy in integer joules, power in watts,
time in seconds (float, from the clock) or milliseconds (int, for billing).

Formulas (``docs/economics.md`` has a worked example)::

    energy cost / GPU-hour = watts / 1000 kW x 1 h x tariff x PUE
    mining      / GPU-hour = watts / 1000 kW x 1 h x mining revenue per kWh
    floor       / GPU-hour = max(energy cost, mining) + margin
    charge (attempt)       = GPU-milliseconds x price per GPU-hour / 3,600,000   (rounded half up)
    broker fee             = charge x fee permille / 1000                       (rounded down)
    farm payout            = charge - broker fee
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rigshift.catalogue import board_watts
from rigshift.units import JOULES_PER_KWH

__all__ = [
    "MS_PER_HOUR",
    "FarmTerms",
    "LedgerEntry",
    "PriceFloor",
    "TariffWindow",
    "charge_micros",
    "credit_for_seconds",
    "energy_cost_micros",
    "floor_price",
    "reliability_permille",
    "settlement_entries",
    "split_fee",
    "tariff_at",
]

MS_PER_HOUR = 3_600_000


@dataclass(frozen=True, slots=True)
class TariffWindow:
    """Hours [start_hour, end_hour) UTC at their own price; wraps midnight when end < start."""

    start_hour: int
    end_hour: int
    micros_per_kwh: int

    def covers(self, hour: int) -> bool:
        """True when ``hour`` (0-23) falls inside the window."""
        if self.start_hour < self.end_hour:
            return self.start_hour <= hour < self.end_hour
        return hour >= self.start_hour or hour < self.end_hour


@dataclass(frozen=True, slots=True)
class FarmTerms:
    """What the core needs to know about a farm to price and settle its work."""

    farm_id: str
    tariff_micros_per_kwh: int = 0
    pue_permille: int = 1000
    broker_fee_permille: int = 100
    margin_micros_per_gpu_hour: int = 0
    mining_micros_per_kwh: tuple[tuple[str, int], ...] = ()
    ask_micros_per_gpu_hour: tuple[tuple[str, int], ...] = ()
    tariff_windows: tuple[TariffWindow, ...] = field(default=())
    # What the farm earns per MWh not drawn in a curtailment window (broker.curtailed).
    demand_response_micros_per_mwh: int = 0

    def mining_for(self, model: str) -> int:
        """Mining revenue per kWh for a GPU model (0 when the operator gave none)."""
        return dict(self.mining_micros_per_kwh).get(model, 0)

    def ask_for(self, model: str) -> int | None:
        """The farm's ask per GPU-hour for a model, if it set one."""
        return dict(self.ask_micros_per_gpu_hour).get(model)


@dataclass(frozen=True, slots=True)
class PriceFloor:
    """How a floor price is made up, per GPU-hour."""

    gpu_model: str
    watts: int
    energy_cost_micros: int
    mining_micros: int
    floor_micros: int


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One leg of a double-entry transaction; the legs of a ``txn`` sum to zero."""

    txn: str
    account: str
    amount_micros: int
    kind: str  # charge | payout | fee | sla_credit
    job_id: str
    attempt: int
    time: float


def _div_half_up(num: int, den: int) -> int:
    return (num + den // 2) // den


def tariff_at(terms: FarmTerms, epoch_s: float) -> int:
    """Electricity price in micro-dollars per kWh at a moment (time-of-use aware, UTC)."""
    hour = int(epoch_s // 3600) % 24
    for window in terms.tariff_windows:
        if window.covers(hour):
            return window.micros_per_kwh
    return terms.tariff_micros_per_kwh


def floor_price(terms: FarmTerms, model: str, watts: int | None = None) -> PriceFloor:
    """The lowest ask the farm may set for one GPU-hour of ``model`` (flat tariff, with PUE).

    ``watts`` is a registered GPU's power limit; without one, the model's board power in
    the GPU catalogue (``rigshift.catalogue``, 250 W for a model it does not hold).
    """
    w = watts or board_watts(model)
    # W x 1 h = W/1000 kWh; x micros/kWh; x PUE/1000.
    energy = _div_half_up(w * terms.tariff_micros_per_kwh * terms.pue_permille, 1000 * 1000)
    mining = _div_half_up(w * terms.mining_for(model), 1000)
    floor = max(energy, mining) + terms.margin_micros_per_gpu_hour
    return PriceFloor(model, w, energy, mining, floor)


def energy_cost_micros(terms: FarmTerms, joules: int, start_s: float, end_s: float) -> int:
    """Electricity cost of ``joules`` drawn evenly over [start, end], with PUE and time of use."""
    if joules <= 0:
        return 0
    if not terms.tariff_windows or end_s <= start_s:
        price = tariff_at(terms, start_s)
        return _div_half_up(joules * price * terms.pue_permille, JOULES_PER_KWH * 1000)
    # Split the interval at hour boundaries; each piece gets its share of the joules.
    total_ms = round((end_s - start_s) * 1000)
    acc = 0  # joule-micros per kWh, summed
    t = start_s
    while t < end_s:
        boundary = min(end_s, (int(t // 3600) + 1) * 3600)
        piece_ms = round((boundary - t) * 1000)
        acc += joules * piece_ms * tariff_at(terms, t)
        t = boundary
    return _div_half_up(acc * terms.pue_permille, max(total_ms, 1) * JOULES_PER_KWH * 1000)


def charge_micros(gpu_milliseconds: int, price_micros_per_gpu_hour: int) -> int:
    """What a client pays for GPU time at a price per GPU-hour."""
    return _div_half_up(gpu_milliseconds * price_micros_per_gpu_hour, MS_PER_HOUR)


def split_fee(charge: int, fee_permille: int) -> tuple[int, int]:
    """(farm payout, broker fee) of a charge; they add up to the charge exactly."""
    fee = charge * fee_permille // 1000
    return charge - fee, fee


def settlement_entries(
    *,
    owner: str,
    farm_id: str,
    job_id: str,
    attempt: int,
    charge: int,
    fee_permille: int,
    now: float,
) -> list[LedgerEntry]:
    """The three legs settling one attempt: client pays, farm and broker receive."""
    payout, fee = split_fee(charge, fee_permille)
    txn = f"settle:{job_id}:{attempt}"
    return [
        LedgerEntry(txn, f"client:{owner}", -charge, "charge", job_id, attempt, now),
        LedgerEntry(txn, f"farm:{farm_id}", payout, "payout", job_id, attempt, now),
        LedgerEntry(txn, "broker:fees", fee, "fee", job_id, attempt, now),
    ]


def credit_for_seconds(seconds: float, gpu_count: int, price_micros_per_gpu_hour: int) -> int:
    """SLA credit worth ``seconds`` of the job's GPUs at its price (capped at one hour)."""
    ms = round(min(max(seconds, 0.0), 3600.0) * 1000) * gpu_count
    return charge_micros(ms, price_micros_per_gpu_hour)


def reliability_permille(window_s: float, offline_s: float, ok: int, lost: int) -> int:
    """Uptime share x attempt success share (Laplace-smoothed), in thousandths.

    E.g. 1 h offline in a 24 h window and 1 lost attempt out of 9:
    (23/24) x ((8+1)/(9+1)) = 0.958 x 0.9 = 862.
    """
    if window_s <= 0:
        return 1000
    uptime = max(0.0, 1.0 - offline_s / window_s)
    success = (ok + 1) / (ok + lost + 1)
    return max(0, min(1000, round(1000 * uptime * success)))
