"""Earnings per farm, worker or GPU, from settled attempts and the ledger (pure).

Revenue is what the farm was paid (the ``payout`` legs of the ledger), energy
cost is the attempt's metered joules at the farm's tariff x PUE, and mining per
kWh is :func:`mining_usd_per_kwh`: what mining would have paid per kWh for the
same energy. The broker's ``rigshift_farm_mining_usd_per_kwh`` gauge uses the
same function, so there is one definition of the figure.

**Energy saved** (issue 16): an attempt placed with an AI power limit
(``Attempt.power_limit_watts``, recorded when it was placed) drew, per GPU, its metered
share; the same GPU time uncapped would have drawn that share x 1000 / the curve's draw
ratio at the limit (``rigshift.power.ratio_at``, thousandths). The difference is
``energy_saved_joules`` (``joules x (1000 - draw) / draw``, rounded half up) and its
cost at the farm's tariff x PUE over the attempt's run ``energy_cost_saved_micros``
(``broker.economics.energy_cost_micros``), both per GPU share. A GPU the worker no
longer lists, or one without a curve, saved nothing.

**Where the attempts come from** (a :class:`SettledSource`): the broker holds no ledger and
forgets finished jobs (docs/scale.md), so it reads the settled attempts and their payouts
from the store (``Store.settled``: the payouts summed in SQL, the attempts streamed one at a
time); a pure core (tests, the replay) is its own source (:class:`CoreSettled`). Workers,
farms' terms and windows always come from the core, which holds them all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from broker.core import Attempt, BrokerCore, Worker
from broker.curtailed import Curtailed, curtailed_by_gpu, gpu_usage
from broker.economics import FarmTerms, energy_cost_micros
from rigshift.power import ratio_at
from rigshift.units import JOULES_PER_KWH

__all__ = [
    "CoreSettled",
    "EarningsLine",
    "Settled",
    "SettledSource",
    "earnings",
    "energy_saved",
    "joules_by_model",
    "mining_usd_per_kwh",
]


def mining_usd_per_kwh(terms: FarmTerms | None, joules: Mapping[str, int]) -> float:
    """What mining would have paid per kWh for this energy, in USD (display only).

    ``joules`` is the energy that AI attempts drew in some period, by the GPU model that
    drew it. Each kWh is valued at the farm's mining figure for its model (a model
    without a figure counts as 0), so the result is energy-weighted:
    ``sum(joules[m] x mining[m]) / sum(joules)``. A farm whose GPUs drew nothing in the
    period gets the mean of its mining table (what an average kWh would earn mining);
    0 when it set no mining figure (or ``terms`` is None).
    """
    if terms is None or not terms.mining_micros_per_kwh:
        return 0.0
    total = sum(joules.values())
    if not total:
        table = [micros for _, micros in terms.mining_micros_per_kwh]
        return sum(table) / len(table) / 1e6
    weighted = sum(j * terms.mining_for(model) for model, j in joules.items())
    return weighted / total / 1e6


def joules_by_model(worker: Worker, attempt: Attempt) -> dict[str, int]:
    """The attempt's metered joules by GPU model, split evenly over its GPUs
    (the way :func:`earnings` splits them; "?" for a GPU the worker no longer lists)."""
    out: dict[str, int] = {}
    n = len(attempt.gpu_indices)
    if not n:
        return out
    for index, joules in zip(attempt.gpu_indices, _split(attempt.energy_joules, n), strict=True):
        model = _model(worker, index)
        out[model] = out.get(model, 0) + joules
    return out


def energy_saved(worker: Worker, index: int, limit_watts: int, joules: int) -> int:
    """Joules GPU ``index`` did not draw for ``joules`` metered at ``limit_watts``, against
    the same GPU time uncapped: ``joules x (1000 - draw) / draw`` with ``draw`` the
    curve's draw ratio at the limit in thousandths (rounded half up); 0 without a limit,
    a curve or the GPU."""
    gpu = worker.gpus.get(index)
    if not limit_watts or gpu is None or joules <= 0:
        return 0
    _, draw = ratio_at(gpu.info.power_curve, limit_watts)
    if draw <= 0 or draw >= 1000:
        return 0
    return (joules * (1000 - draw) + draw // 2) // draw


def _model(worker: Worker, index: int) -> str:
    gpu = worker.gpus.get(index)
    return gpu.info.model if gpu else "?"


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
    energy_saved_joules: int = 0  # against the same GPU time uncapped (power caps)
    energy_cost_saved_micros: int = 0
    mining_usd_per_kwh: float = 0.0  # see mining_usd_per_kwh(); display only
    model_joules: dict[str, int] = field(default_factory=dict)  # energy by GPU model
    model_ms: dict[str, int] | None = None
    curtailed: Curtailed = field(default_factory=Curtailed)  # broker.curtailed

    @property
    def margin_micros(self) -> int:
        """Revenue minus energy cost."""
        return self.revenue_micros - self.energy_cost_micros

    @property
    def kwh(self) -> float:
        """Energy in kWh (display only)."""
        return self.energy_joules / JOULES_PER_KWH

    @property
    def revenue_usd_per_kwh(self) -> float:
        """Revenue per kWh in USD (display only)."""
        return self.revenue_micros / 1e6 / self.kwh if self.energy_joules else 0.0


def _split(total: int, parts: int) -> list[int]:
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


@dataclass(frozen=True, slots=True)
class Settled:
    """A settled attempt and what its farm was paid for it (its ``payout`` legs)."""

    attempt: Attempt
    payout_micros: int


class SettledSource(Protocol):
    """Where earnings read settled attempts: the store (``Store.settled``) or a core."""

    def settled(self, *, farm_id: str = "", since: float | None = None) -> Iterable[Settled]:
        """Settled attempts that ended at or after ``since`` (all when None), on workers of
        ``farm_id`` when set, with their payouts."""
        ...


class CoreSettled:
    """A pure core's settled attempts and its ledger's payouts (``keep_ledger=True``)."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    def settled(self, *, farm_id: str = "", since: float | None = None) -> Iterator[Settled]:
        """See :class:`SettledSource`."""
        payouts: dict[tuple[str, int], int] = {}
        for e in self.core.ledger:
            if e.kind == "payout":
                key = (e.job_id, e.attempt)
                payouts[key] = payouts.get(key, 0) + e.amount_micros
        for job in self.core.jobs.values():
            for a in job.attempts:
                if not a.settled or a.end_time is None:
                    continue
                if since is not None and a.end_time < since:
                    continue
                worker = self.core.workers.get(a.worker_id)
                if farm_id and (worker is None or worker.farm_id != farm_id):
                    continue
                yield Settled(a, payouts.get((job.job_id, a.number), 0))


def earnings(
    core: BrokerCore,
    *,
    farm_id: str = "",
    since: float = 0.0,
    group_by: str = "farm",
    now: float = float("inf"),
    source: SettledSource | None = None,
) -> list[EarningsLine]:
    """Rows sorted by key; every farm appears when grouping by farm, even with no sales.

    A row's ``mining_usd_per_kwh`` is :func:`mining_usd_per_kwh` of its farm's terms and
    the row's energy by GPU model. Its ``curtailed`` figures are ``broker.curtailed``'s,
    windows counted up to ``now`` (default: their ends). ``source``: where the settled
    attempts and payouts come from (default: the core itself, :class:`CoreSettled`).
    """
    if source is None:
        source = CoreSettled(core)
    rows: dict[str, EarningsLine] = {}
    if group_by == "farm":
        for fid in core.farms:
            if not farm_id or fid == farm_id:
                rows[f"farms/{fid}"] = EarningsLine(f"farms/{fid}", fid)
    for settled in source.settled(farm_id=farm_id, since=since):
        a = settled.attempt
        if a.end_time is None:
            continue
        worker = core.workers.get(a.worker_id)
        if worker is None or (farm_id and worker.farm_id != farm_id):
            continue
        terms = core.farms.get(worker.farm_id, FarmTerms(worker.farm_id))
        start = a.start_time if a.start_time is not None else a.end_time
        cost = energy_cost_micros(terms, a.energy_joules, start, a.end_time)
        revenue = settled.payout_micros
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
            model = _model(worker, index)
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
            row.model_joules[model] = row.model_joules.get(model, 0) + joules
            saved = energy_saved(worker, index, a.power_limit_watts, joules)
            if saved:
                row.energy_saved_joules += saved
                row.energy_cost_saved_micros += energy_cost_micros(terms, saved, start, a.end_time)
            row.model_ms = row.model_ms or {}
            row.model_ms[model] = row.model_ms.get(model, 0) + ms
        row_keys = {
            "farm": [f"farms/{worker.farm_id}"],
            "worker": [f"workers/{worker.worker_id}"],
            "gpu": [f"workers/{worker.worker_id}/gpus/{i}" for i in a.gpu_indices],
        }[group_by]
        for key in row_keys:
            rows[key].attempts += 1
    _add_curtailed(core, rows, farm_id, since, group_by, now, source)
    for row in rows.values():
        row.mining_usd_per_kwh = mining_usd_per_kwh(core.farms.get(row.farm_id), row.model_joules)
        if row.model_ms:
            row.gpu_model = max(sorted(row.model_ms), key=lambda m: row.model_ms[m])  # type: ignore[index]
    return [rows[k] for k in sorted(rows)]


def _add_curtailed(
    core: BrokerCore,
    rows: dict[str, EarningsLine],
    farm_id: str,
    since: float,
    group_by: str,
    now: float,
    source: SettledSource,
) -> None:
    if not core.windows:
        return
    # The average AI draw counts every settled attempt of the farm, not only since ``since``.
    usage = gpu_usage(s.attempt for s in source.settled(farm_id=farm_id, since=None))
    figures = curtailed_by_gpu(
        core.windows.values(),
        core.workers.values(),
        (),
        core.farms,
        farm_id=farm_id,
        since=since,
        now=now,
        usage=usage,
    )
    for (fid, worker_id, index), c in figures.items():
        key = {
            "farm": f"farms/{fid}",
            "worker": f"workers/{worker_id}",
            "gpu": f"workers/{worker_id}/gpus/{index}",
        }[group_by]
        rows.setdefault(key, EarningsLine(key, fid)).curtailed.add(c)
