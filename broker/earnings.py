"""Earnings per farm, worker or GPU, from settled attempts and the ledger (pure).

Revenue is what the farm was paid (the ``payout`` legs of the ledger), energy
cost is the attempt's metered joules at the farm's tariff x PUE, and mining per
kWh is what the operator said the same GPUs earn mining, weighted by energy.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.core import BrokerCore
from broker.economics import J_PER_KWH, FarmTerms, energy_cost_micros

__all__ = ["EarningsLine", "earnings"]


@dataclass(slots=True)
class EarningsLine:
    """One row of earnings; money in micro-dollars, energy in joules."""

    key: str
    farm_id: str
    gpu_model: str = ""
    gpu_milliseconds: int = 0
    energy_joules: int = 0
    revenue_micros: int = 0
    energy_cost_micros: int = 0
    attempts: int = 0
    mining_micro_joules: int = 0  # sum of joules x mining micros/kWh, to weight the rate
    model_ms: dict[str, int] | None = None

    @property
    def margin_micros(self) -> int:
        """Revenue minus energy cost."""
        return self.revenue_micros - self.energy_cost_micros

    @property
    def kwh(self) -> float:
        """Energy in kWh (display only)."""
        return self.energy_joules / J_PER_KWH

    @property
    def revenue_usd_per_kwh(self) -> float:
        """Revenue per kWh in USD (display only)."""
        return self.revenue_micros / 1e6 / self.kwh if self.energy_joules else 0.0

    @property
    def mining_usd_per_kwh(self) -> float:
        """Energy-weighted mining alternative in USD per kWh (display only)."""
        if not self.energy_joules:
            return 0.0
        return self.mining_micro_joules / self.energy_joules / 1e6


def _split(total: int, parts: int) -> list[int]:
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


def earnings(
    core: BrokerCore, *, farm_id: str = "", since: float = 0.0, group_by: str = "farm"
) -> list[EarningsLine]:
    """Rows sorted by key; every farm appears when grouping by farm, even with no sales."""
    payouts: dict[tuple[str, int], int] = {}
    for e in core.ledger:
        if e.kind == "payout":
            payouts[(e.job_id, e.attempt)] = payouts.get((e.job_id, e.attempt), 0) + e.amount_micros
    rows: dict[str, EarningsLine] = {}
    if group_by == "farm":
        for fid in core.farms:
            if not farm_id or fid == farm_id:
                rows[f"farms/{fid}"] = EarningsLine(f"farms/{fid}", fid)
    for job in core.jobs.values():
        for a in job.attempts:
            if not a.settled or a.end_time is None or a.end_time < since:
                continue
            worker = core.workers.get(a.worker_id)
            if worker is None or (farm_id and worker.farm_id != farm_id):
                continue
            terms = core.farms.get(worker.farm_id, FarmTerms(worker.farm_id))
            start = a.start_time if a.start_time is not None else a.end_time
            cost = energy_cost_micros(terms, a.energy_joules, start, a.end_time)
            revenue = payouts.get((job.job_id, a.number), 0)
            n = len(a.gpu_indices)
            shares = zip(
                a.gpu_indices,
                _split(a.gpu_milliseconds(a.end_time), n),
                _split(a.energy_joules, n),
                _split(revenue, n),
                _split(cost, n),
                strict=True,
            )
            for index, ms, joules, rev, cst in shares:
                gpu = worker.gpus.get(index)
                model = gpu.info.model if gpu else "?"
                key = {
                    "farm": f"farms/{worker.farm_id}",
                    "worker": f"workers/{worker.worker_id}",
                    "gpu": f"workers/{worker.worker_id}/gpus/{index}",
                }[group_by]
                row = rows.setdefault(key, EarningsLine(key, worker.farm_id))
                row.gpu_milliseconds += ms
                row.energy_joules += joules
                row.revenue_micros += rev
                row.energy_cost_micros += cst
                row.mining_micro_joules += joules * terms.mining_for(model)
                row.model_ms = row.model_ms or {}
                row.model_ms[model] = row.model_ms.get(model, 0) + ms
            row_keys = {
                "farm": [f"farms/{worker.farm_id}"],
                "worker": [f"workers/{worker.worker_id}"],
                "gpu": [f"workers/{worker.worker_id}/gpus/{i}" for i in a.gpu_indices],
            }[group_by]
            for key in row_keys:
                rows[key].attempts += 1
    for row in rows.values():
        if row.model_ms:
            row.gpu_model = max(sorted(row.model_ms), key=lambda m: row.model_ms[m])  # type: ignore[index]
    return [rows[k] for k in sorted(rows)]
