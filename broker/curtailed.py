"""Curtailment in a farm's earnings (issue 16, pure): per GPU, the time its farm's windows
were on, the energy it did not draw then, and the demand-response income for it.

For each window that was on (not cancelled before its start), the span from its start to
its end (or its cancellation, or ``now``), cut to ``since``. Every GPU the farm's workers
list counts for the whole span. The energy not drawn is the GPU's **average AI draw**
minus its **idle draw**, over the span: the average AI draw is what the farm's settled
attempts on GPUs of that model metered per GPU-second (the GPU's power limit, or its
model's board power, when nothing was metered); the idle draw is the catalogue's
(``rigshift.catalogue``). Demand response pays ``Farm.demand_response_micros_per_mwh``
for that energy: its own line of the farm's earnings, never in the client ledger.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.economics import FarmTerms
from broker.records import Attempt, Job, Worker
from broker.windows import Window
from rigshift.catalogue import board_watts, lookup

__all__ = ["Curtailed", "curtailed_by_gpu", "demand_response_micros", "gpu_usage"]

JOULES_PER_MWH = 3_600_000_000


@dataclass(slots=True)
class Curtailed:
    """One GPU's curtailment figures (or a row's, summed)."""

    gpu_milliseconds: int = 0
    energy_joules: int = 0
    demand_response_micros: int = 0

    def add(self, other: Curtailed) -> None:
        """Add another's figures to these."""
        self.gpu_milliseconds += other.gpu_milliseconds
        self.energy_joules += other.energy_joules
        self.demand_response_micros += other.demand_response_micros


def demand_response_micros(terms: FarmTerms | None, joules: int) -> int:
    """What the farm's demand-response price pays for ``joules`` not drawn (floor)."""
    price = terms.demand_response_micros_per_mwh if terms else 0
    return joules * price // JOULES_PER_MWH


def gpu_usage(attempts: Iterable[Attempt]) -> dict[tuple[str, int], tuple[int, int]]:
    """(worker id, first GPU index) -> (joules, GPU-milliseconds) of the settled attempts
    among these: what the average AI draw is computed from."""
    out: dict[tuple[str, int], tuple[int, int]] = {}
    for a in attempts:
        if not a.settled or a.end_time is None or not a.gpu_indices:
            continue
        key = (a.worker_id, a.gpu_indices[0])
        joules, ms = out.get(key, (0, 0))
        out[key] = (joules + a.energy_joules, ms + a.gpu_milliseconds(a.end_time))
    return out


def _ai_watts(
    workers: Iterable[Worker], usage: dict[tuple[str, int], tuple[int, int]], farm_id: str
) -> dict[str, float]:
    """Average metered draw per GPU of each model, over the farm's settled attempts."""
    joules: dict[str, int] = {}
    ms: dict[str, int] = {}
    by_id = {w.worker_id: w for w in workers if w.farm_id == farm_id}
    for (worker_id, index), (j, m) in usage.items():
        worker = by_id.get(worker_id)
        if worker is None:
            continue
        gpu = worker.gpus.get(index)
        model = gpu.info.model if gpu else "?"
        joules[model] = joules.get(model, 0) + j
        ms[model] = ms.get(model, 0) + m
    return {m: joules[m] * 1000 / ms[m] for m in ms if ms[m] > 0 and joules[m] > 0}


def _span(w: Window, since: float, now: float) -> float:
    end = min(w.end_time, now if w.cancel_time is None else min(now, w.cancel_time))
    return max(0.0, end - max(w.start_time, since))


def curtailed_by_gpu(
    windows: Iterable[Window],
    workers: Iterable[Worker],
    jobs: Iterable[Job],
    terms: dict[str, FarmTerms],
    *,
    farm_id: str = "",
    since: float = 0.0,
    now: float = float("inf"),
    usage: dict[tuple[str, int], tuple[int, int]] | None = None,
) -> dict[tuple[str, str, int], Curtailed]:
    """(farm id, worker id, GPU index) -> its figures, for every GPU of a farm with a window
    that was on (of ``farm_id`` only, when set). ``usage`` (:func:`gpu_usage` of the settled
    attempts, e.g. read from the store) replaces the attempts of ``jobs``."""
    worker_list = list(workers)
    if usage is None:
        usage = gpu_usage(a for job in jobs for a in job.attempts)
    seconds: dict[str, float] = {}
    for w in windows:
        if farm_id and w.farm_id != farm_id:
            continue
        s = _span(w, since, now)
        if s > 0:
            seconds[w.farm_id] = seconds.get(w.farm_id, 0.0) + s
    out: dict[tuple[str, str, int], Curtailed] = {}
    for fid, s in seconds.items():
        watts = _ai_watts(worker_list, usage, fid)
        for worker in worker_list:
            if worker.farm_id != fid:
                continue
            for index, gpu in worker.gpus.items():
                model = gpu.info.model
                ai = watts.get(model) or gpu.info.power_limit_watts or board_watts(model)
                spec = lookup(model)
                idle = spec.idle_w if spec else 0
                joules = int(max(0.0, ai - idle) * s)
                out[(fid, worker.worker_id, index)] = Curtailed(
                    int(s * 1000), joules, demand_response_micros(terms.get(fid), joules)
                )
    return out
